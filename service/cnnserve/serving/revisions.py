"""The revision store: every fine-tuned version of a model's weights, shared by all its workers.

TorchServe runs each worker as its own process with its own copy of the weights. The store on disk is the
single source of truth; workers are caches of it::

    <root>/<model>/<version>-<base sha256[:12]>/
        manifest.json          every revision: kind, parent, step, sha256, file, request_id, result
        HEAD                   "<revision> <sha256>": read on every classify batch (a few microseconds)
        rev-000007.safetensors weights of revision 7 (revisions with the base's weights have no file)
        momentum.safetensors   SGD momentum buffers of the head revision
        lock                   flock(2) target: one writer at a time, across processes

Revision 0 is the trained base, whose weights ship inside the .mar. A fine-tune step, a rollback and a reset
each append a revision; nothing is rewritten. Writers hold the lock for the whole read-modify-write; readers
never lock: files are immutable once renamed into place, and ``manifest.json`` and ``HEAD`` are replaced
atomically (manifest first, so a HEAD a reader sees is always in the manifest).

The store never holds a non-finite value: ``manifest.json`` is strict JSON (written with ``allow_nan=False``,
any non-finite float in a step's result becoming ``null``), and weights or momentum with a NaN or an infinity
are refused before anything is written. A manifest written by an older cnnserve may hold ``NaN``: it is read
with such values as ``None`` (and rewritten strict at the next commit); such a revision's weights are refused
where they would be served (``ModelService``).

:class:`AbstractRevisionStore` is what the worker needs of a store (read the head, read a revision, commit a
new revision on top of its parent, find a step by its request id, momentum); :class:`FileRevisionStore` is the
implementation that ships (a local disk, or a POSIX volume the replicas share), still constructible under its
old name :data:`RevisionStore`. docs/finetune.md says what holds across replicas, and what an object-store or
database-backed implementation would need.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from cnnserve.errors import ConflictError, FailedPreconditionError, NotFoundError
from cnnserve.serving.finetune import first_non_finite
from cnnserve.weights import load_weights, read_metadata, save_weights

__all__ = [
    "Revision",
    "AbstractRevisionStore",
    "FileRevisionStore",
    "RevisionStore",
    "DEFAULT_RETENTION",
    "finite_json",
    "require_store",
]

DEFAULT_RETENTION = 10  # besides the base
MANIFEST = "manifest.json"
HEAD = "HEAD"
MOMENTUM = "momentum.safetensors"
LOCK = "lock"


@dataclass
class Revision:
    revision: int
    kind: str  # base | step | rollback | reset
    sha256: str
    file: str | None  # None: the base weights that ship in the .mar
    parent: int | None = None
    step: int = 0  # SGD steps in this revision's lineage
    created: float = field(default_factory=time.time)
    request_id: str | None = None
    result: dict[str, Any] | None = None  # what the step returned, for idempotent replays
    pruned: bool = False

    def public(self) -> dict[str, Any]:
        """What clients see of a revision (no file paths)."""
        data = asdict(self)
        data.pop("file")
        return data


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


class AbstractRevisionStore(abc.ABC):
    """One model's revisions, shared by every worker of every replica: what the worker needs of a store.

    Readers never wait for a writer: ``head`` and ``manifest`` return committed states, never a torn one, and
    a committed revision never changes. A writer calls ``find_request`` and ``append`` inside ``locked()``;
    ``append`` commits only on top of ``parent`` (``ConflictError`` when the head has moved): a store with
    conditional writes makes that the commit itself, the file store checks it under its lock.
    """

    # ---- reading (no lock) ----------------------------------------------------------------------

    @abc.abstractmethod
    def head(self) -> tuple[int, str]:
        """(revision, sha256) of the head: read on every classify batch, so it must be cheap."""

    @abc.abstractmethod
    def manifest(self) -> dict[str, Any]:
        """The committed manifest (strict JSON): ``{"head": int, "revisions": [Revision fields], ...}``."""

    @abc.abstractmethod
    def load(self, revision: Revision) -> dict[str, torch.Tensor]:
        """A revision's weights, checked against its sha256."""

    def revisions(self) -> list[Revision]:
        return [Revision(**entry) for entry in self.manifest()["revisions"]]

    def get(self, revision: int) -> Revision:
        """A kept revision; NOT_FOUND for one that never existed or was pruned."""
        manifest = self.manifest()
        for entry in manifest["revisions"]:
            if entry["revision"] == revision:
                found = Revision(**entry)
                if found.pruned:
                    kept = [r["revision"] for r in manifest["revisions"] if not r["pruned"]]
                    raise NotFoundError(f"revision {revision} was pruned (kept: {_ranges(kept)})")
                return found
        raise NotFoundError(f"revision {revision} does not exist (head is {manifest['head']})")

    # ---- writing (under the lock) ---------------------------------------------------------------

    @abc.abstractmethod
    def locked(self) -> AbstractContextManager[None]:
        """The writer's critical section: one writer at a time, across processes and replicas."""

    def find_request(self, request_id: str) -> Revision | None:
        """The revision a request id already produced (call under the lock)."""
        for entry in self.manifest()["revisions"]:
            if entry.get("request_id") == request_id:
                return Revision(**entry)
        return None

    @abc.abstractmethod
    def append(
        self,
        kind: str,
        parent: int,
        step: int,
        weights: dict[str, torch.Tensor] | None = None,
        same_as: Revision | None = None,
        momentum: dict[str, torch.Tensor] | None = None,
        request_id: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Revision:
        """Commit a revision on top of ``parent``, the head, and make it the head (call under the lock).

        Either ``weights`` (stored as a new immutable object) or ``same_as`` (reuse that revision's weights)
        is given. ``momentum`` are the SGD buffers to continue from at the new revision; without them the next
        step starts with none (rollback and reset). ``ConflictError`` when ``parent`` is not the head.
        """

    @abc.abstractmethod
    def save_momentum(self, revision: int, buffers: dict[str, torch.Tensor]) -> None:
        """Momentum buffers for ``revision`` (the head); the next step continues from them."""

    @abc.abstractmethod
    def load_momentum(self, revision: int) -> dict[str, torch.Tensor]:
        """Buffers saved for ``revision``; none when they belong to another revision (after a rollback)."""


class FileRevisionStore(AbstractRevisionStore):
    """The store in a directory (the layout above): a local disk, or a POSIX volume the replicas share.

    Safe to use from many processes at once (and from replicas on a volume with working flock, atomic rename
    and close-to-open consistency: docs/finetune.md).
    """

    def __init__(
        self,
        root: str | Path,
        model: str,
        version: str,
        base_sha256: str,
        base_weights: str | Path,
        retention: int = DEFAULT_RETENTION,
    ) -> None:
        if retention < 1:
            raise ValueError("retention must keep at least one revision besides the base")
        self.directory = Path(root) / model / f"{version}-{base_sha256[:12]}"
        self.base_sha256 = base_sha256
        self.base_weights = Path(base_weights)
        self.retention = retention
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.locked():
            if not (self.directory / MANIFEST).exists():
                base = Revision(revision=0, kind="base", sha256=base_sha256, file=None)
                self._commit(
                    {
                        "model": model,
                        "version": version,
                        "base_sha256": base_sha256,
                        "head": 0,
                        "revisions": [asdict(base)],
                    }
                )

    # ---- reading (no lock) ----------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(revision, sha256) of the head, from the tiny HEAD file."""
        text = (self.directory / HEAD).read_text().split()
        return int(text[0]), text[1]

    def manifest(self) -> dict[str, Any]:
        """The manifest, with any non-finite number an older cnnserve wrote (``NaN``) read as ``None``."""
        return finite_json(json.loads((self.directory / MANIFEST).read_text()))  # type: ignore[no-any-return]

    def load(self, revision: Revision) -> dict[str, torch.Tensor]:
        """A revision's weights, checked against its sha256."""
        path = self.base_weights if revision.file is None else self.directory / revision.file
        return load_weights(path, revision.sha256)

    # ---- writing (under the lock) ---------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes (flock), released when the process dies."""
        with open(self.directory / LOCK, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def append(
        self,
        kind: str,
        parent: int,
        step: int,
        weights: dict[str, torch.Tensor] | None = None,
        same_as: Revision | None = None,
        momentum: dict[str, torch.Tensor] | None = None,
        request_id: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Revision:
        """Add a revision on top of ``parent`` and make it the head (call under the lock).

        Either ``weights`` (written to a new file) or ``same_as`` (reuse that revision's file) is given.
        ``momentum`` are the SGD buffers to continue from at the new revision; without them the next step
        starts with none (rollback and reset).
        """
        manifest = self.manifest()
        if parent != manifest["head"]:
            # Under a working lock the caller read the head it passes; this catches a writer that did not
            # take the lock, or a volume whose locks do not reach the other replicas (docs/finetune.md).
            raise ConflictError(
                f"revision store {self.directory}: the head is {manifest['head']}, not the parent {parent}"
            )
        number = max(entry["revision"] for entry in manifest["revisions"]) + 1
        _refuse_non_finite(weights, "weights")
        _refuse_non_finite(momentum, "momentum buffer")
        if weights is not None:
            new_file = f"rev-{number:06d}.safetensors"
            sha256 = save_weights(weights, self.directory / new_file)
            file_name: str | None = new_file
        elif same_as is not None:
            file_name, sha256 = same_as.file, same_as.sha256
        else:
            raise ValueError("append needs weights or same_as")
        if result is not None:
            result = {**result, "revision": number}
        self.save_momentum(number, momentum or {})  # before the commit: the new head never lacks its own
        revision = Revision(
            number, kind, sha256, file_name, parent, step, request_id=request_id, result=result
        )
        manifest["revisions"].append(asdict(revision))
        manifest["head"] = number
        self._prune(manifest)
        self._commit(manifest)
        return revision

    def save_momentum(self, revision: int, buffers: dict[str, torch.Tensor]) -> None:
        """Momentum buffers for ``revision`` (the head); the next step continues from them."""
        _refuse_non_finite(buffers, "momentum buffer")
        if buffers:
            save_weights(buffers, self.directory / MOMENTUM, metadata={"revision": str(revision)})
        else:
            (self.directory / MOMENTUM).unlink(missing_ok=True)

    def load_momentum(self, revision: int) -> dict[str, torch.Tensor]:
        """Buffers saved for ``revision``; none when they belong to another revision (after a rollback)."""
        path = self.directory / MOMENTUM
        if not path.exists():
            return {}
        if read_metadata(path).get("revision") != str(revision):
            return {}
        return load_weights(path)

    def _prune(self, manifest: dict[str, Any]) -> None:
        """Keep the base and the newest ``retention`` revisions; delete files nothing kept refers to."""
        entries = manifest["revisions"]
        kept_numbers = {e["revision"] for e in entries[-self.retention :]} | {0}
        for entry in entries:
            entry["pruned"] = entry["revision"] not in kept_numbers
        needed = {e["file"] for e in entries if not e["pruned"] and e["file"]}
        for entry in entries:
            if entry["pruned"] and entry["file"] and entry["file"] not in needed:
                (self.directory / entry["file"]).unlink(missing_ok=True)

    def _commit(self, manifest: dict[str, Any]) -> None:
        head = next(e for e in manifest["revisions"] if e["revision"] == manifest["head"])
        text = json.dumps(finite_json(manifest), indent=1, allow_nan=False)
        _write_atomic(self.directory / MANIFEST, text + "\n")
        _write_atomic(self.directory / HEAD, f"{head['revision']} {head['sha256']}\n")


def finite_json(value: Any) -> Any:
    """``value`` (decoded JSON) with every NaN and infinity replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_json(item) for item in value]
    return value


def _refuse_non_finite(tensors: dict[str, torch.Tensor] | None, what: str) -> None:
    """A bug guard: the step checked already; the store must never hold a NaN or an infinity."""
    bad = first_non_finite((tensors or {}).items())
    if bad is not None:
        raise ValueError(f"refusing to store {what} {bad}: it has non-finite values")


def _ranges(numbers: list[int]) -> str:
    """[0, 5, 6, 7] -> '0, 5-7'."""
    groups: list[list[int]] = []
    for number in sorted(numbers):
        if groups and number == groups[-1][1] + 1:
            groups[-1][1] = number
        else:
            groups.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in groups)


RevisionStore = FileRevisionStore
"""The store that ships, under the name callers have always constructed."""

_Store = TypeVar("_Store", bound=AbstractRevisionStore)


def require_store(store: _Store | None) -> _Store:
    if store is None:
        raise FailedPreconditionError(
            "fine-tuning is disabled: no revision store is configured "
            "(set CNNSERVE_REVISIONS_DIR in TorchServe's environment)"
        )
    return store
