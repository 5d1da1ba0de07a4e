"""ModelService: everything a TorchServe worker does for one model, without TorchServe.

The handler hands it TorchServe's batch (a list of request dicts) and gets back one :class:`Reply` per
request, in order. Classify requests in a batch are answered with one forward pass per weights revision;
the other operations run one by one. A bad request gets its own 4xx reply and never fails its neighbours.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from cnnserve.card import ModelCard, load_card
from cnnserve.contract import (
    PACKED_REPLY,
    ClassifyReply,
    ClassifyRequest,
    ClassScore,
    FineTuneReply,
    FineTuneRequest,
    InfoRequest,
    ModelInfo,
    Prediction,
    RawInput,
    Request,
    ResetRequest,
    RevisionChangeReply,
    RevisionInfo,
    RevisionsReply,
    RevisionsRequest,
    RollbackRequest,
    ShapesReply,
    ShapesRequest,
    WorkerTiming,
    encode_json,
    error_json,
    pack_classify,
    parse_request,
)
from cnnserve.errors import (
    CnnserveError,
    ConflictError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
)
from cnnserve.preprocess import Preprocessing, decode_images, decode_tensor, prepare_decoded
from cnnserve.runtime import Runtime, card_precision_info, load_runtime
from cnnserve.serving.finetune import (
    DEFAULT_MAX_LR,
    DivergedStepError,
    StepSettings,
    first_non_finite,
    sgd_step,
)
from cnnserve.serving.revisions import (
    DEFAULT_RETENTION,
    AbstractRevisionStore,
    Revision,
    RevisionStore,
    require_store,
)
from cnnserve.shapes import layer_shapes
from cnnserve.weights import load_into, load_weights

__all__ = ["ServiceConfig", "Reply", "ModelService"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    format: str = "onnx"  # onnx | torchscript: the runtime classify uses
    device: str = "cpu"  # cpu | cuda:N
    threads: int = 1  # intra-op threads per worker
    max_inputs: int = 64  # per classify request
    max_finetune_batch: int = 256
    max_forward_batch: int = 64  # inputs per forward pass when a TorchServe batch is larger
    revisions_dir: str | None = None  # None: fine-tuning disabled, the base is served
    retention: int = DEFAULT_RETENTION
    runtime_cache: int = 4  # loaded revisions kept per worker
    max_lr: float = DEFAULT_MAX_LR  # a fine-tune step asking for more is refused (INVALID_ARGUMENT)
    requested_device: str | None = None  # what TorchServe and the archive asked for (None: ``device``)
    require_device: bool = False  # a GPU asked for but unusable: refuse to start instead of using CPU
    # Each cached ONNX Runtime CUDA session keeps its own memory arena (it grows to the largest batch seen
    # and never shrinks): on CUDA keep at most this many; 2 is the head plus one pinned or previous revision.
    gpu_runtime_cache: int = 2
    gpu_mem_limit_mb: int | None = None  # per runtime on CUDA (ONNX Runtime's gpu_mem_limit); None: no limit

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def cache_size(self) -> int:
        """Loaded revisions kept per worker on this device."""
        return min(self.runtime_cache, self.gpu_runtime_cache) if self.on_cuda else self.runtime_cache


JSON_CONTENT_TYPE = "application/json"
PACKED_CONTENT_TYPE = "application/octet-stream"  # a packed classify reply (contract.pack_classify)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE


def _info(revision: Revision) -> RevisionInfo:
    return RevisionInfo.from_json(revision.public())


def _scores(labels: Sequence[str], indices: list[int], probabilities: list[float]) -> tuple[ClassScore, ...]:
    return tuple(ClassScore(labels[i], i, p) for i, p in zip(indices, probabilities))


def _packed_reply(
    reply: ClassifyReply,
    labels: Sequence[str],
    indices: np.ndarray,
    probabilities: np.ndarray,
    scored: list[int],
    slot_errors: dict[int, CnnserveError],
) -> Reply:
    """``reply`` packed: the ``(M, k)`` top-k of the ``scored`` slots, the errors in theirs."""
    rows, k = len(scored) + len(slot_errors), indices.shape[1]
    packed_indices = np.full((rows, k), -1, "<i4")  # (rows, k); an error slot's row stays filler
    packed_probabilities = np.zeros((rows, k), "<f4")
    packed_indices[scored] = indices
    packed_probabilities[scored] = probabilities
    named = {int(i): labels[i] for i in np.unique(indices)}
    body = pack_classify(
        reply, rows, k, packed_indices.tobytes(), packed_probabilities.tobytes(), slot_errors, named
    )
    return Reply(200, body, PACKED_CONTENT_TYPE)


def _error_reply(exc: CnnserveError) -> Reply:
    return Reply(exc.kind.http_status, encode_json(error_json(exc)))


# What the operations other than classify answer (typing.Union: workers may run Python 3.9).
_OtherReply = Union[ShapesReply, FineTuneReply, ModelInfo, RevisionsReply, RevisionChangeReply]


@dataclass
class _Trainer:
    """The worker's trainable copy: eager weights at ``revision``, kept between steps."""

    model: torch.nn.Module
    revision: int = -1
    sha256: str = ""


@dataclass
class _Pending:
    """A classify request on its way through a batch."""

    index: int
    request: ClassifyRequest
    revision: Revision | None = None
    tensors: list[torch.Tensor | CnnserveError] = field(default_factory=list)


class ModelService:
    def __init__(self, model_dir: str | Path, config: ServiceConfig, name: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.card: ModelCard = load_card(self.model_dir)
        self.name = name or self.card.name
        self.pre = Preprocessing.from_card(self.card)
        self.base_weights = self.model_dir / self.card.weights_file
        self.base = Revision(revision=0, kind="base", sha256=self.card.weights_sha256, file=None)
        self.store: AbstractRevisionStore | None = None
        if config.revisions_dir:
            self.store = RevisionStore(
                config.revisions_dir,
                self.name,
                self.card.version,
                self.card.weights_sha256,
                self.base_weights,
                retention=config.retention,
            )
        self._runtimes: OrderedDict[str, Runtime] = OrderedDict()
        base = self._runtime(self.base)  # fail at start-up, not on the first request
        # What every runtime of this worker really runs on (they are all built alike), reported in replies:
        # ``cpu`` when CUDA was asked for but cannot be used (load_runtime logged why).
        self.device: str = base.device
        self.provider: str = base.provider  # CUDAExecutionProvider | CPUExecutionProvider | torch
        with torch.device("meta"):
            self._shape_model = self.card.build_model()  # architecture only, no memory
        self._trainer: _Trainer | None = None
        self._head_cache: Revision | None = None
        self._unservable: dict[str, str] = {}  # sha256 -> why: weights an older cnnserve stored with NaN
        decode_images([], self.pre.channels)  # loads the PNG decoder (torchvision: seconds) now, not later

    # ---- the batch ------------------------------------------------------------------------------

    def handle(self, requests: Sequence[Mapping[str, Any]]) -> list[Reply]:
        """One reply per TorchServe request, in order."""
        replies: list[Reply | None] = [None] * len(requests)
        classify: list[_Pending] = []
        for index, raw in enumerate(requests):
            try:
                request = parse_request(raw)
                if isinstance(request, ClassifyRequest):
                    classify.append(_Pending(index, request))
                else:
                    replies[index] = Reply(200, encode_json(self._dispatch(request).to_json()))
            except CnnserveError as exc:
                replies[index] = _error_reply(exc)
        for pending, reply in zip(classify, self._classify(classify)):
            replies[pending.index] = reply
        answered = [reply for reply in replies if reply is not None]
        assert len(answered) == len(requests), "every request gets exactly one reply"
        return answered

    def _dispatch(self, request: Request) -> _OtherReply:
        if isinstance(request, ShapesRequest):
            return self.shapes(request)
        if isinstance(request, FineTuneRequest):
            return self.finetune(request)
        if isinstance(request, InfoRequest):
            return self.info()
        if isinstance(request, RevisionsRequest):
            return self.list_revisions()
        if isinstance(request, RollbackRequest):
            return self.rollback(request.to_revision, kind="rollback")
        assert isinstance(request, ResetRequest), request
        return self.rollback(0, kind="reset")

    # ---- classify -------------------------------------------------------------------------------

    def _head(self) -> Revision:
        """The head revision: one read of the HEAD file; the manifest only when the head has moved."""
        if self.store is None:
            return self.base
        number, sha256 = self.store.head()
        cached = self._head_cache
        if cached is None or (cached.revision, cached.sha256) != (number, sha256):
            cached = self._head_cache = self.store.get(number)
        return cached

    def _resolve(self, request: ClassifyRequest, head: Revision) -> Revision:
        if request.revision is not None:
            if self.store is None:
                if request.revision == 0:
                    return self.base
                raise NotFoundError(f"revision {request.revision} does not exist: fine-tuning is disabled")
            revision = self.store.get(request.revision)
        else:
            revision = head
        if request.min_revision is not None and revision.revision < request.min_revision:
            if request.revision is not None:
                raise InvalidInputError.for_field(
                    "min_revision", f"pinned revision {request.revision} is older than {request.min_revision}"
                )
            raise NotFoundError(f"revision {request.min_revision} does not exist (head is {head.revision})")
        return revision

    def _decode(
        self, inputs: Sequence[RawInput], positions: Sequence[int] | None = None
    ) -> list[torch.Tensor | CnnserveError]:
        """Each input decoded, in order: a tensor as ``(1, C, H, W)`` float, an image as uint8 ``(C, H, W)``
        (prepared later), or that input's error, its field named by the input's position in its own request
        (``positions``; default: its index here). The images go through one :func:`decode_images` call,
        however many requests they came in."""
        where = range(len(inputs)) if positions is None else positions
        decoded: list[torch.Tensor | CnnserveError | None] = []
        images: list[int] = []  # indices of the image inputs
        for index, raw in enumerate(inputs):
            if raw.shape is None:
                images.append(index)
                decoded.append(None)
                continue
            try:
                field = f"inputs[{where[index]}]"
                decoded.append(decode_tensor(raw.data, raw.shape, self.card.input_shape, field=field)[None])
            except CnnserveError as exc:
                decoded.append(exc)
        for index, image in zip(images, decode_images([inputs[i].data for i in images], self.pre.channels)):
            if isinstance(image, InvalidInputError):
                description = image.violations[0].description
                decoded[index] = InvalidInputError.for_field(f"inputs[{where[index]}].image", description)
            else:
                decoded[index] = image
        return [item for item in decoded if item is not None]

    def _classify(self, batch: list[_Pending]) -> list[Reply]:
        """The batch's classify requests: admit (revision, decode), preprocess, one forward pass per weights
        revision, answer. A request's error is its own; with per_input_errors, an input's is its own."""
        if not batch:
            return []
        started = time.perf_counter()
        try:
            head = self._head()
        except CnnserveError as exc:
            return [_error_reply(exc) for _ in batch]
        errors: dict[int, CnnserveError] = {}  # request index -> the error that fails the whole request
        groups = self._admit(batch, head, errors)
        self._prepare([p for p in batch if p.index not in errors])
        preprocessed = time.perf_counter()
        logits = self._forward(groups, errors)
        timing = WorkerTiming(
            preprocess_ms=(preprocessed - started) * 1000,
            inference_ms=(time.perf_counter() - preprocessed) * 1000,
            batch_requests=len(batch),
        )
        return [self._answer(pending, errors, logits, timing) for pending in batch]

    def _admit(
        self, batch: list[_Pending], head: Revision, errors: dict[int, CnnserveError]
    ) -> dict[str, list[tuple[_Pending, int]]]:
        """Resolve each request's revision and decode its inputs; the inputs grouped by weights (sha256)."""
        groups: dict[str, list[tuple[_Pending, int]]] = {}
        admitted: list[_Pending] = []
        for pending in batch:
            try:
                if len(pending.request.inputs) > self.config.max_inputs:
                    raise InvalidInputError.for_field(
                        "inputs",
                        f"{len(pending.request.inputs)} inputs; at most {self.config.max_inputs} per request",
                    )
                pending.revision = self._resolve(pending.request, head)
            except CnnserveError as exc:
                errors[pending.index] = exc
                continue
            admitted.append(pending)
        # Every image of the batch in one decode call (one pass of the C decoder's set-up).
        decoded = iter(
            self._decode(
                [raw for pending in admitted for raw in pending.request.inputs],
                [position for pending in admitted for position in range(len(pending.request.inputs))],
            )
        )
        for pending in admitted:
            assert pending.revision is not None
            for position in range(len(pending.request.inputs)):
                item = next(decoded)
                pending.tensors.append(item)
                if isinstance(item, CnnserveError):
                    if not pending.request.per_input_errors:
                        errors.setdefault(pending.index, item)
                    continue
                groups.setdefault(pending.revision.sha256, []).append((pending, position))
        return groups

    def _forward(
        self, groups: dict[str, list[tuple[_Pending, int]]], errors: dict[int, CnnserveError]
    ) -> dict[tuple[int, int], np.ndarray]:
        """Logits per (request index, input position): one stacked run per weights revision."""
        logits: dict[tuple[int, int], np.ndarray] = {}
        for members in groups.values():
            live = [(p, i) for p, i in members if p.index not in errors]
            if not live:
                continue
            assert live[0][0].revision is not None
            try:
                runtime = self._runtime(live[0][0].revision)
            except CnnserveError as exc:
                for pending, _ in live:
                    errors.setdefault(pending.index, exc)
                continue
            stacked = torch.cat([p.tensors[i] for p, i in live])  # type: ignore[misc]  # (N, C, H, W)
            step = self.config.max_forward_batch
            outputs = np.concatenate(
                [runtime.run(stacked[s : s + step]) for s in range(0, len(stacked), step)]
            )  # (N, classes)
            finite = np.isfinite(outputs).all(axis=1)
            for (pending, position), row, ok in zip(live, outputs, finite):  # one output row per input
                if ok:
                    logits[(pending.index, position)] = row
                    continue
                # Finite weights can still overflow on some input (a step whose loss exploded but stayed
                # finite): answer that input with an error, never NaN probabilities.
                assert pending.revision is not None
                unstable = FailedPreconditionError(
                    f"revision {pending.revision.revision} of {self.name} produced non-finite scores for "
                    f"inputs[{position}]: its weights are unstable; pin or roll back to an earlier revision, "
                    "or Reset"
                )
                pending.tensors[position] = unstable
                if not pending.request.per_input_errors:
                    errors.setdefault(pending.index, unstable)
        return logits

    def _answer(
        self,
        pending: _Pending,
        errors: dict[int, CnnserveError],
        logits: dict[tuple[int, int], np.ndarray],
        timing: WorkerTiming,
    ) -> Reply:
        if pending.index in errors:
            return _error_reply(errors[pending.index])
        assert pending.revision is not None
        request = pending.request
        slot_errors = {i: t for i, t in enumerate(pending.tensors) if isinstance(t, CnnserveError)}
        scored = [i for i in range(len(pending.tensors)) if i not in slot_errors]
        if scored:
            block = np.stack([logits[(pending.index, i)] for i in scored])  # (M, classes)
        else:  # per_input_errors, and every input failed
            block = np.zeros((0, self.card.num_classes), np.float32)
        indices, probabilities = self._top_k(block, request.top_k)  # (M, k), k = min(top_k, classes)
        reply = ClassifyReply(
            model=self.name,
            version=self.card.version,
            revision=pending.revision.revision,
            predictions=(),
            format=self.config.format,
            device=self.device,
            provider=self.provider,
            worker=os.getpid(),  # which TorchServe worker process answered
            timing=timing,
        )
        labels = self.card.labels
        if request.reply == PACKED_REPLY:
            return _packed_reply(reply, labels, indices, probabilities, scored, slot_errors)
        scores = iter(zip(indices.tolist(), probabilities.tolist()))  # one per scored input, in order
        predictions: tuple[Prediction, ...] = tuple(
            slot_errors[i] if i in slot_errors else _scores(labels, *next(scores))
            for i in range(len(pending.tensors))
        )
        return Reply(200, encode_json(replace(reply, predictions=predictions).to_json()))

    @staticmethod
    def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most probable classes of each row of ``(N, classes)`` logits, best first: ``(N, k')``
        class indices and their softmax probabilities (float32), ``k' = min(k, classes)``. The sort is
        stable, so equal probabilities keep class order. (A method: tests wrap it to make a worker fail.)"""
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # (N, classes)
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, : min(k, logits.shape[1])]  # (N, k')
        return order, np.take_along_axis(probabilities, order, axis=1)

    def _prepare(self, batch: list[_Pending]) -> None:
        """Preprocess every decoded image of the batch at once (one call per image size)."""
        slots = [(p, i) for p in batch for i, t in enumerate(p.tensors) if isinstance(t, torch.Tensor)]
        prepared = prepare_decoded([p.tensors[i] for p, i in slots], self.pre)  # type: ignore[misc]
        for (pending, position), tensor in zip(slots, prepared):
            pending.tensors[position] = tensor

    def _runtime(self, revision: Revision, weights: Mapping[str, torch.Tensor] | None = None) -> Runtime:
        """The runtime serving ``revision``'s weights, from the per-worker LRU cache (keyed by sha256)."""
        cached = self._runtimes.get(revision.sha256)
        if cached is not None:
            self._runtimes.move_to_end(revision.sha256)
            return cached
        if weights is None and revision.sha256 != self.base.sha256:
            weights = self._load_checked(revision)
        while len(self._runtimes) >= self.config.cache_size:  # free the oldest first: GPU memory is tight
            self._runtimes.popitem(last=False)
        runtime = load_runtime(
            self.model_dir,
            self.config.format,
            weights,
            self.config.device,
            self.config.threads,
            **self._load_options(),
        )
        self._runtimes[revision.sha256] = runtime
        return runtime

    def _load_options(self) -> dict[str, Any]:
        """``load_runtime``'s device keywords: on CUDA, refuse a CPU fallback when asked to, warm up the
        batch sizes classify runs (cuDNN picks its kernels on a shape's first call), cap the session's memory.
        """
        if not self.config.on_cuda:
            return {}
        limit = self.config.gpu_mem_limit_mb
        return {
            "require_device": self.config.require_device,
            "warm_up": (1, self.config.max_forward_batch),
            "input_shape": self.card.input_shape,
            "gpu_mem_limit_bytes": None if limit is None else limit * 2**20,
        }

    # ---- the other operations -------------------------------------------------------------------

    def shapes(self, request: ShapesRequest) -> ShapesReply:
        shape = request.input_shape or self.card.input_shape
        return ShapesReply(self.name, self.card.version, layer_shapes(self._shape_model, shape))

    def info(self) -> ModelInfo:
        card = self.card
        precision = card_precision_info(card)
        return ModelInfo(
            model=self.name,
            version=card.version,
            architecture=card.architecture,
            arch_args=card.arch_args,
            input_shape=tuple(card.input_shape),
            labels=tuple(card.labels),
            mean=tuple(card.normalization.mean),
            std=tuple(card.normalization.std),
            resize=tuple(card.resize),
            pad=card.pad,
            dataset=card.dataset,
            training={
                k: card.training.get(k) for k in ("test_accuracy", "steps", "epochs_run", "wall_seconds")
            },
            formats=tuple(sorted(card.exports)),
            format=self.config.format,
            device=self.device,
            provider=self.provider,
            requested_device=self.config.requested_device or self.config.device,
            parity=card.parity,
            precision=precision["precision"],
            precision_report={k: v for k, v in precision.items() if k != "precision"},
            base_sha256=card.weights_sha256,
            revision=self._head().revision,
            fine_tuning=self.store is not None,
            retention=self.config.retention,
        )

    def list_revisions(self) -> RevisionsReply:
        if self.store is None:
            return RevisionsReply(self.name, 0, (_info(self.base),), fine_tuning=False)
        manifest = self.store.manifest()
        revisions = tuple(_info(Revision(**e)) for e in manifest["revisions"])
        return RevisionsReply(self.name, manifest["head"], revisions, fine_tuning=True)

    def rollback(self, to_revision: int, kind: str) -> RevisionChangeReply:
        """Make ``to_revision``'s weights the head again, as a new revision (rollback and reset)."""
        store = require_store(self.store)
        checked: dict[str, torch.Tensor] | None = None
        with store.locked():
            target = self.base if to_revision == 0 else store.get(to_revision)
            if target.sha256 != self.base.sha256 and target.sha256 not in self._runtimes:
                checked = self._load_checked(target)  # never make weights with NaN the head again
            head, _ = store.head()
            revision = store.append(kind, parent=head, step=target.step, same_as=target)
        if checked is not None:
            self._runtime(revision, checked)  # read once: serve it from the weights just checked
        log.info(
            "%s %s: revision %d now serves the weights of revision %d",
            kind,
            self.name,
            revision.revision,
            to_revision,
        )
        return RevisionChangeReply(self.name, self.card.version, _info(revision), to_revision)

    def finetune(self, request: FineTuneRequest) -> FineTuneReply:
        store = require_store(self.store)
        if request.lr > self.config.max_lr:
            raise InvalidInputError.for_field(
                "lr",
                f"{request.lr:g} is above this model's bound of {self.config.max_lr:g} (max_lr: raise it "
                "with CNNSERVE_MAX_LR in TorchServe's environment, or handler.max_lr in the archive's "
                "model-config.yaml)",
            )
        if len(request.inputs) > self.config.max_finetune_batch:
            raise InvalidInputError.for_field(
                "inputs",
                f"{len(request.inputs)} inputs; at most {self.config.max_finetune_batch} per fine-tune step",
            )
        bad = [label for label in request.labels if not 0 <= label < self.card.num_classes]
        if bad:
            raise InvalidInputError.for_field(
                "labels", f"{bad[0]} is outside [0, {self.card.num_classes}) for {self.name}"
            )
        decoded = self._decode(request.inputs)
        failed = next((item for item in decoded if isinstance(item, CnnserveError)), None)
        if failed is not None:
            raise failed
        inputs = torch.cat(prepare_decoded(decoded, self.pre))  # type: ignore[arg-type]  # all tensors
        labels = torch.tensor(request.labels, dtype=torch.int64)
        settings = StepSettings(
            request.lr, request.momentum, request.weight_decay, request.train_layers, request.max_grad_norm
        )

        with store.locked():  # one writer per model across every worker process
            if request.request_id is not None:
                done = store.find_request(request.request_id)
                if done is not None and done.result is not None:
                    return self._replay(request.request_id, done)
            head_number, _ = store.head()
            if request.expected_revision is not None and request.expected_revision != head_number:
                raise ConflictError(
                    f"{self.name} is at revision {head_number}, not the expected {request.expected_revision}"
                )
            head = self.base if head_number == 0 else store.get(head_number)
            trainer = self._trainer_at(head, store)
            device = torch.device(self.config.device)
            try:
                result, buffers = sgd_step(
                    trainer.model,
                    inputs.to(device),
                    labels.to(device),
                    settings,
                    store.load_momentum(head.revision),
                )
            except BaseException as exc:
                # sgd_step put the weights back; reloading the head anyway makes the next step start from
                # the store's head whatever a failed step left behind (refused steps are rare).
                trainer.revision, trainer.sha256 = -1, ""
                if isinstance(exc, DivergedStepError):
                    raise self._diverged(exc, settings, head) from None
                raise
            # A snapshot, not views of the trainable parameters that the next step changes in place.
            weights = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
            answer = FineTuneReply(
                model=self.name,
                version=self.card.version,
                revision=-1,  # the store numbers it
                parent=head.revision,
                step=head.step + 1,
                loss_before=result.loss_before,
                loss_after=result.loss_after,
                batch_accuracy=result.batch_accuracy,
                grad_norm=result.grad_norm,
                batch_size=len(labels),
                train_layers=settings.train_layers,
                lr=settings.lr,
                grad_clipped=result.grad_clipped,
                max_grad_norm=settings.max_grad_norm,
            )
            # Kept with the revision for replays of this request_id (the store adds the revision number).
            stored = {k: v for k, v in answer.to_json().items() if k not in ("revision", "replayed")}
            revision = store.append(
                "step",
                parent=head.revision,
                step=head.step + 1,
                weights=weights,
                momentum=buffers,
                request_id=request.request_id,
                result=stored,
            )
            trainer.revision, trainer.sha256 = revision.revision, revision.sha256
        self._runtime(revision, weights)  # this worker serves the new revision without re-reading it
        log.info(
            "fine-tune step on %s -> revision %d, loss %.4f -> %.4f",
            self.name,
            revision.revision,
            result.loss_before,
            result.loss_after,
        )
        return replace(answer, revision=revision.revision)

    def _diverged(self, exc: DivergedStepError, settings: StepSettings, head: Revision) -> CnnserveError:
        """FAILED_PRECONDITION for a refused step: what diverged, with which lr, and the unchanged head."""
        clip = "" if settings.max_grad_norm is None else f" and max_grad_norm {settings.max_grad_norm:g}"
        log.warning(
            "fine-tune step on %s refused: %s (lr %g%s); head stays at revision %d",
            self.name,
            exc.reason,
            settings.lr,
            clip,
            head.revision,
        )
        return FailedPreconditionError(
            f"fine-tune step refused: {exc.reason} with lr {settings.lr:g}{clip}; {self.name} stays at "
            f"revision {head.revision} and nothing was written (try a smaller lr, or max_grad_norm to clip "
            "the gradient)"
        )

    def _replay(self, request_id: str, done: Revision) -> FineTuneReply:
        """The first result of ``request_id``: unless an older cnnserve stored that step diverged."""
        assert done.result is not None
        missing = [
            key
            for key in ("loss_before", "loss_after", "grad_norm")
            if not isinstance(done.result.get(key), (int, float))
        ]
        if missing:  # NaN read back as None: this cnnserve would have refused the step
            raise FailedPreconditionError(
                f"request_id {request_id!r} was applied as revision {done.revision} by an older cnnserve and "
                f"diverged ({missing[0]} is not finite); that revision is never served: Reset or roll back, "
                "then send the step again with a new request_id"
            )
        return FineTuneReply.from_json({**done.result, "replayed": True})

    def _load_checked(self, revision: Revision) -> dict[str, torch.Tensor]:
        """A stored revision's weights; FAILED_PRECONDITION when they hold a NaN or an infinity.

        Only an older cnnserve, which published diverged steps, can have stored such weights: they are never
        served nor trained on. The verdict is kept per sha256, so a bad head costs one read per worker.
        """
        why = self._unservable.get(revision.sha256)
        if why is None:
            weights = require_store(self.store).load(revision)
            bad = first_non_finite(weights.items())
            if bad is None:
                return weights
            why = self._unservable[revision.sha256] = f"{bad} has non-finite values"
        raise FailedPreconditionError(
            f"revision {revision.revision} of {self.name} cannot be served: its weights are not finite "
            f"({why}; stored by an older cnnserve that published diverged steps); pin a good revision, "
            "roll back to one, or Reset"
        )

    def _trainer_at(self, head: Revision, store: AbstractRevisionStore) -> _Trainer:
        """The trainable copy, loaded with ``head``'s weights unless it already holds them."""
        if self._trainer is None:
            model = self.card.build_model().to(self.config.device)
            self._trainer = _Trainer(model)
        trainer = self._trainer
        if trainer.revision != head.revision or trainer.sha256 != head.sha256:
            state = (
                load_weights(self.base_weights, head.sha256)
                if head.file is None
                else self._load_checked(head)
            )
            load_into(trainer.model, state)
            trainer.revision, trainer.sha256 = head.revision, head.sha256
        return trainer
