"""The targets: each ratio computed from rows of one run, and for a missed one the figures that explain it.

The explanation of a miss is taken from the same rows: the CPU each process spent per image, the share of
the machine (``cores`` x 100 %) the point used and how much of it went to processes outside the benchmark,
the gateway's micro-batch sizes, and where a call's time went. It says what those figures show and no more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cnnserve.bench.results import Row

__all__ = ["TargetResult", "evaluate_targets", "find", "title", "cpu_ms_per_call"]

# What each target requires (the one place these are defined).
GATEWAY_VS_TORCHSERVE = 1.0  # x torchserve-grpc (batching on), 1 image per call, highest concurrency
GATEWAY_VS_ECHO = 0.7  # x grpc-echo, same point
BATCHED_CALL = {"lenet": 0.5, "alexnet": 0.8}  # x ort-inprocess at the batch one call carries
EXTRA_HOP_MS = 1.0  # gateway p50 over torchserve-grpc p50, 1 client, the same registration
FINETUNE_FACTOR, FINETUNE_SLACK_MS = 2.0, 10.0  # finetune-gateway <= factor x finetune-inprocess + slack
COLD_START_S = 30.0
# Our gateway's OIP service (oip-grpc) against the KServe peer (kserve-oip): the same preprocessed FP32
# tensors as the same serialized ModelInfer requests. (clients, images per call; None: the model's batched
# call, LeNet 64, AlexNet 32) -> the throughput ratio required.
VS_KSERVE: dict[tuple[int, int | None], float] = {(64, 1): 1.5, (8, 1): 0.8, (1, None): 0.6, (8, None): 0.6}
KSERVE_P50_FACTOR = 2.0  # oip-grpc p50 <= this x kserve-oip p50, 1 client, 1 image per call
GATEWAY_CPU_VS_ECHO = 1.3  # the gateway's CPU ms per call <= this x the echo server's, same concurrency
# Machine CPU at or above this share of all its cores counts as saturated: throughput is then CPU-bound.
SATURATED = 0.85
# CPU (% of one core) used outside the benchmark during a point from which it is worth naming.
BUSY_ELSEWHERE = 50.0


@dataclass
class TargetResult:
    key: str
    description: str
    required: str  # e.g. ">= 1.00x"
    measured: float | None  # the ratio (or seconds / ms, as ``unit`` says); None: not measured
    unit: str  # "x", "ms", "s"
    met: bool | None  # None: not measured in this run
    figures: str = ""  # the numbers the ratio comes from
    shortfall: str = ""  # by how much it was missed
    why: list[str] = field(default_factory=list)  # evidence from this run
    close: list[str] = field(default_factory=list)  # what the figures say would close the gap

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def title(model: str) -> str:
    return {"lenet": "LeNet", "alexnet": "AlexNet"}.get(model, model)


def find(
    rows: Sequence[Row],
    name: str,
    model: str,
    *,
    concurrency: int | None = None,
    images_per_call: int | None = None,
    batching: str | None = None,
    inputs: str = "png",
) -> Row | None:
    """The first row that matches; gateway rows count only when the gateway fronted TorchServe."""
    for row in rows:
        if row.name != name or row.model != model or row.backend == "inprocess" or row.inputs != inputs:
            continue
        if concurrency is not None and row.concurrency != concurrency:
            continue
        if images_per_call is not None and row.images_per_call != images_per_call:
            continue
        if batching is not None and row.batching != batching:
            continue
        return row
    return None


@dataclass(frozen=True)
class _Machine:
    cores: int | None  # None: not recorded; then nothing is said about saturation

    @property
    def capacity(self) -> float | None:
        """Machine CPU % with every core busy (100 % per core)."""
        return None if self.cores is None else 100.0 * self.cores

    def saturated(self, row: Row) -> bool | None:
        if self.capacity is None or row.machine_cpu_percent is None:
            return None
        return row.machine_cpu_percent >= SATURATED * self.capacity

    def share(self, percent: float) -> str:
        return f"{percent:.0f} %" + (f" of {self.capacity:.0f} %" if self.capacity is not None else "")


# ---- evidence ---------------------------------------------------------------------------------------


def _cpu_us_per_image(row: Row) -> dict[str, float]:
    """CPU microseconds each process spent per image served: the cost model behind a CPU-bound point."""
    if not row.throughput_img_s:
        return {}
    costs = {"load generator": row.client_cpu_percent or 0.0, **row.server_cpu_percent}
    return {
        name: round(percent / 100.0 * 1e6 / row.throughput_img_s, 1)
        for name, percent in costs.items()
        if percent >= 1.0
    }


def _others_percent(row: Row) -> float:
    """CPU the machine spent outside the processes of this point (other people's work, the kernel)."""
    ours = (row.client_cpu_percent or 0.0) + sum(row.server_cpu_percent.values())
    return max(0.0, (row.machine_cpu_percent or 0.0) - ours)


def _describe_cpu(label: str, row: Row, machine: _Machine) -> str:
    costs = _cpu_us_per_image(row)
    parts = ", ".join(f"{name} {us:.0f}" for name, us in costs.items())
    busy = machine.share(row.machine_cpu_percent or 0)
    return (
        f"{label}: {row.throughput_img_s:.0f} img/s, machine CPU {busy} "
        f"(100 % per core; {_others_percent(row):.0f} % of it outside this benchmark); CPU µs per image: "
        f"{parts} (total {sum(costs.values()):.0f})"
    )


def _gateway_batching(row: Row) -> str:
    extra = row.extra
    if "mean_gateway_server_ms" not in extra:
        return ""
    server, backend = extra["mean_gateway_server_ms"], extra["mean_backend_ms"]
    batch = (
        f"{extra['mean_micro_batch']:.1f} inputs per TorchServe request on average; "
        if "mean_micro_batch" in extra
        else ""
    )
    return (
        f"gateway at {row.concurrency} clients: {batch}per call {server:.2f} ms in the gateway, of which "
        f"{backend:.2f} ms waiting on TorchServe"
    )


Explain = Callable[[Row, Row, TargetResult, float], None]


def _ratio_target(
    key: str, description: str, ours: Row | None, theirs: Row | None, required: float, explain: Explain
) -> TargetResult:
    result = TargetResult(key, description, f">= {required:.2f}x", None, "x", None)
    if ours is None or theirs is None or not ours.throughput_img_s or not theirs.throughput_img_s:
        return result
    ratio = ours.throughput_img_s / theirs.throughput_img_s
    result.measured, result.met = round(ratio, 3), ratio >= required
    result.figures = f"{ours.throughput_img_s:.1f} vs {theirs.throughput_img_s:.1f} img/s"
    if not result.met:
        result.shortfall = (
            f"{ratio:.2f}x instead of {required:.2f}x: {100 * (1 - ratio / required):.0f} % short, "
            f"{required * theirs.throughput_img_s - ours.throughput_img_s:.0f} img/s more needed"
        )
        explain(ours, theirs, result, required)
    return result


def _explain_cpu_bound(their_label: str, rows: Sequence[Row], machine: _Machine) -> Explain:
    def explain(ours: Row, theirs: Row, result: TargetResult, required: float) -> None:
        result.why.append(_describe_cpu("gateway", ours, machine))
        result.why.append(_describe_cpu(their_label, theirs, machine))
        batching = _gateway_batching(ours)
        if batching:
            result.why.append(batching)
        ours_cost = _cpu_us_per_image(ours)
        gateway_us = ours_cost.get("gateway", 0.0)
        echo = find(rows, "grpc-echo", ours.model, concurrency=ours.concurrency)
        echo_us = _cpu_us_per_image(echo).get("echo", 0.0) if echo else 0.0
        if echo_us and gateway_us:
            result.why.append(
                f"a bare grpc.aio server spent {echo_us:.0f} µs CPU per call at the same concurrency "
                f"(grpc-echo): the gateway's {gateway_us:.0f} µs per one-image call is "
                f"{gateway_us / echo_us:.1f}x that"
            )
        direct = find(rows, "torchserve-grpc", ours.model, concurrency=ours.concurrency, batching="on")
        direct_us = _cpu_us_per_image(direct).get("torchserve", 0.0) if direct else 0.0
        behind_us = ours_cost.get("torchserve", 0.0)
        if direct_us and behind_us:
            result.why.append(
                f"TorchServe spent {direct_us:.0f} µs CPU per image called directly and {behind_us:.0f} µs "
                "behind the gateway's micro-batches"
            )
        total = sum(ours_cost.values())
        saturated = machine.saturated(ours)
        if saturated and total:
            # Saturated: images/s = CPU-µs available per second / CPU-µs per image. The CPU this point got,
            # spread over the required images/s, is the budget per image.
            spent = total * (ours.throughput_img_s or 0)  # CPU-µs per second on this path
            allowed = spent / (required * (theirs.throughput_img_s or 1))
            result.why.append(
                f"the machine was saturated ({machine.share(ours.machine_cpu_percent or 0)}, at least "
                f"{SATURATED * 100:.0f} %), so throughput is the CPU this point got divided by the CPU per "
                f"image: the gateway path costs {total:.0f} µs per image in all, {gateway_us:.0f} µs of it "
                "in the gateway"
            )
            result.close.append(
                f"with the CPU this point got ({_others_percent(ours):.0f} % went to other processes), the "
                f"whole path must cost <= {allowed:.0f} µs CPU per image (now {total:.0f}), of which the "
                f"gateway's own is {gateway_us:.0f} µs"
            )
        elif saturated is False:
            waited = ""
            if "mean_gateway_server_ms" in ours.extra:
                server, backend = ours.extra["mean_gateway_server_ms"], ours.extra["mean_backend_ms"]
                waited = (
                    f": a call took {ours.mean_ms:.2f} ms on average, {server:.2f} ms of it in the gateway "
                    f"and {backend:.2f} ms of that waiting on TorchServe"
                )
            result.why.append(
                f"the machine was not saturated ({machine.share(ours.machine_cpu_percent or 0)}, under "
                f"{SATURATED * 100:.0f} %): CPU did not bound this point{waited}"
            )
            wanted = required * (theirs.throughput_img_s or 0)  # images/s, one image per call
            result.close.append(
                f"the calls' waiting, not their CPU: {wanted:.0f} img/s from {ours.concurrency} closed-loop "
                f"clients means a mean call of <= {1000.0 * ours.concurrency / (wanted or 1):.2f} ms "
                f"(now {ours.mean_ms:.2f})"
            )

    return explain


def _explain_batched_call(model: str, per_call: int, rows: Sequence[Row], machine: _Machine) -> Explain:
    def explain(ours: Row, theirs: Row, result: TargetResult, required: float) -> None:
        service = find(rows, "service-inprocess", model, images_per_call=per_call)
        forward = theirs.p50_ms
        threads = theirs.extra.get("threads")
        how = "ONNX Runtime" + (f", {threads} thread{'s' * (threads != 1)}" if threads else "")
        pieces = [f"the model alone: {forward:.2f} ms per {per_call}-image forward ({how}, p50)"]
        biggest = ("", 0.0)
        if service is not None:
            handler = service.p50_ms - forward
            pieces.append(f"decode + preprocess + reply in the handler: +{handler:.2f} ms (in-process, p50)")
            biggest = max(
                biggest, ("decoding and preprocessing the PNGs in the handler", handler), key=lambda b: b[1]
            )
        extra = ours.extra
        if "mean_backend_ms" in extra:
            backend, server = extra["mean_backend_ms"], extra["mean_gateway_server_ms"]
            base = service.p50_ms if service is not None else forward
            pieces.append(
                f"TorchServe around the handler (transport, queue, worker IPC): +{backend - base:.2f} ms"
            )
            pieces.append(f"the gateway itself: +{server - backend:.2f} ms")
            pieces.append(
                f"client <-> gateway: +{ours.mean_ms - server:.2f} ms (mean call {ours.mean_ms:.2f} ms)"
            )
            biggest = max(
                biggest,
                ("TorchServe around the handler", backend - base),
                ("the gateway", server - backend),
                key=lambda b: b[1],
            )
        result.why.append("where a call's time goes: " + "; ".join(pieces))
        worker = ours.server_cpu_percent.get("torchserve", 0.0)
        others = _others_percent(ours)
        if machine.saturated(ours) and others >= BUSY_ELSEWHERE:
            result.why.append(
                f"the machine was saturated ({machine.share(ours.machine_cpu_percent or 0)}) and processes "
                f"outside this benchmark used {others:.0f} % of it, while TorchServe's process tree got "
                f"{worker:.0f} % of a core: part of TorchServe's share above may be waiting for a core"
            )
        tensors = find(rows, "gateway", model, images_per_call=per_call, batching="off", inputs="tensor")
        if tensors is not None and tensors.throughput_img_s:
            ratio = tensors.throughput_img_s / (theirs.throughput_img_s or 1)
            result.why.append(
                f"the same call with preprocessed float32 tensors instead of PNGs: "
                f"{tensors.throughput_img_s:.1f} img/s ({ratio:.2f}x), p50 {tensors.p50_ms:.2f} ms"
            )
        budget_ms = per_call * 1000.0 / (required * (theirs.throughput_img_s or 1))
        now_ms = 1000.0 * per_call / (ours.throughput_img_s or 1)
        result.close.append(
            f"a {per_call}-image call must take <= {budget_ms:.2f} ms (now {now_ms:.2f} ms); "
            f"the largest piece is {biggest[0] or 'outside the model'} ({biggest[1]:.2f} ms)"
        )

    return explain


def _latency_target(rows: Sequence[Row], model: str, machine: _Machine) -> TargetResult:
    key = f"p50-c1-{model}"
    limit = EXTRA_HOP_MS
    description = (
        f"{title(model)}, 1 client: gateway p50 <= torchserve-grpc p50 + {limit:g} ms (same registration)"
    )
    result = TargetResult(key, description, f"<= +{limit:.2f} ms", None, "ms", None)
    # Both on the archive the gateway serves (batching off): the difference is the extra hop.
    ours = find(rows, "gateway", model, concurrency=1, images_per_call=1, batching="off")
    theirs = find(rows, "torchserve-grpc", model, concurrency=1, batching="off")
    if ours is None or theirs is None:
        return result
    delta = ours.p50_ms - theirs.p50_ms
    result.measured, result.met = round(delta, 3), delta <= limit
    batched = find(rows, "torchserve-grpc", model, concurrency=1, batching="on")
    result.figures = f"{ours.p50_ms:.2f} vs {theirs.p50_ms:.2f} ms" + (
        f" (TorchServe with its own batching: {batched.p50_ms:.2f} ms)" if batched else ""
    )
    if not result.met:
        result.shortfall = f"+{delta:.2f} ms instead of <= +{limit:.2f} ms: {delta - limit:.2f} ms over"
        extra = ours.extra
        if "mean_gateway_server_ms" in extra:
            server, backend = extra["mean_gateway_server_ms"], extra["mean_backend_ms"]
            own, hop = server - backend, ours.mean_ms - server
            slower = backend - theirs.mean_ms  # TorchServe's answer to the gateway against a direct call
            result.why.append(
                f"per call (means): {ours.mean_ms:.2f} ms through the gateway = {hop:.2f} ms between "
                f"client and gateway (the extra hop) + {own:.2f} ms in the gateway itself + {backend:.2f} "
                f"ms waiting on TorchServe; a direct torchserve-grpc call took {theirs.mean_ms:.2f} ms"
            )
            gap = ours.mean_ms - theirs.mean_ms
            result.close.append(
                f"the gap of the means, {gap:.2f} ms, is the hop ({hop:.2f} ms), the gateway's own time "
                f"({own:.2f} ms) and {slower:+.2f} ms waiting on TorchServe against a direct call; together "
                f"they must come to <= {limit:.2f} ms"
            )
        others = _others_percent(ours)
        if others >= BUSY_ELSEWHERE:
            result.why.append(
                f"processes outside this benchmark used {machine.share(others)} CPU during this point"
            )
    return result


def _finetune_target(rows: Sequence[Row]) -> TargetResult:
    ours, theirs = find(rows, "finetune-gateway", "lenet"), find(rows, "finetune-inprocess", "lenet")
    images = f", {ours.images_per_call} images" if ours is not None else ""
    result = TargetResult(
        "finetune",
        f"LeNet{images}: finetune-gateway <= {FINETUNE_FACTOR:g}x finetune-inprocess + {FINETUNE_SLACK_MS:g} "
        "ms (medians)",
        "<= 1.00x of the bound",
        None,
        "x",
        None,
    )
    if ours is None or theirs is None:
        return result
    bound = FINETUNE_FACTOR * theirs.p50_ms + FINETUNE_SLACK_MS
    result.measured, result.met = round(ours.p50_ms / bound, 3), ours.p50_ms <= bound
    result.figures = f"{ours.p50_ms:.1f} ms vs bound {bound:.1f} ms (in-process {theirs.p50_ms:.1f} ms)"
    if not result.met:
        result.shortfall = f"{ours.p50_ms - bound:.1f} ms over the bound"
        extra = ours.extra
        if "median_gateway_server_ms" in extra:
            server, backend = extra["median_gateway_server_ms"], extra["median_backend_ms"]
            result.why.append(
                f"per step (medians): {server:.1f} ms in the gateway, {backend:.1f} ms of it in TorchServe; "
                f"in-process the same work takes {theirs.p50_ms:.1f} ms"
            )
            result.close.append(
                f"TorchServe's {backend:.1f} ms against the handler's {theirs.p50_ms:.1f} ms in-process: the "
                f"{backend - theirs.p50_ms:.1f} ms between them is outside the step itself"
            )
    return result


def _cold_start_target(rows: Sequence[Row]) -> TargetResult:
    result = TargetResult(
        "cold-start",
        "cnnserve serve --detach -> first Classify (median)",
        f"<= {COLD_START_S:g} s",
        None,
        "s",
        None,
    )
    row = find(rows, "cold-start", "lenet")
    if row is None:
        return result
    seconds = row.p50_ms / 1000.0
    result.measured, result.met = round(seconds, 2), seconds <= COLD_START_S
    result.figures = (
        f"median {seconds:.1f} s, worst {row.extra.get('seconds_max', 0):.1f} s over {row.reps} starts"
    )
    if not result.met:
        result.shortfall = f"{seconds - COLD_START_S:.1f} s over"
        for run in row.extra.get("runs", [])[:1]:
            returned, classified = run["serve_returned_s"], run["first_classify_s"]
            result.why.append(
                f"first start: `cnnserve serve --detach` returned after {returned:.1f} s; "
                f"the first Classify {classified - returned:.1f} s later"
            )
    return result


def cpu_ms_per_call(row: Row | None, tree: str) -> float | None:
    """CPU milliseconds ``tree`` spent per call of ``row`` (timed repetitions, from /proc), if recorded."""
    if row is None:
        return None
    value = row.extra.get("cpu_ms_per_call", {}).get(tree)
    return float(value) if value is not None else None


def _cpu_per_call_target(rows: Sequence[Row], concurrency: int, machine: _Machine) -> TargetResult:
    limit = GATEWAY_CPU_VS_ECHO
    result = TargetResult(
        f"gateway-cpu-per-call-c{concurrency}",
        f"LeNet, 1 image per call, {concurrency} client{'s' * (concurrency != 1)}: gateway CPU per call <= "
        f"{limit:g}x grpc-echo's",
        f"<= {limit:.2f}x",
        None,
        "x",
        None,
    )
    ours = find(rows, "gateway", "lenet", concurrency=concurrency, images_per_call=1, batching="off")
    echo = find(rows, "grpc-echo", "lenet", concurrency=concurrency)
    gateway_ms, echo_ms = cpu_ms_per_call(ours, "gateway"), cpu_ms_per_call(echo, "echo")
    if ours is None or echo is None or not gateway_ms or not echo_ms:
        return result
    ratio = gateway_ms / echo_ms
    result.measured, result.met = round(ratio, 3), ratio <= limit
    result.figures = f"{gateway_ms:.3f} vs {echo_ms:.3f} CPU ms per call"
    if not result.met:
        over = gateway_ms - limit * echo_ms
        result.shortfall = f"{ratio:.2f}x instead of <= {limit:.2f}x: {over:.3f} CPU ms per call over"
        behind = cpu_ms_per_call(ours, "torchserve")
        batch = ours.extra.get("mean_micro_batch")
        result.why.append(
            f"per call the gateway process used {gateway_ms:.3f} CPU ms, the echo server {echo_ms:.3f} ms "
            "for the same request bytes; the load generator "
            f"{ours.extra.get('client_cpu_ms_per_call', 0):.3f} vs "
            f"{echo.extra.get('client_cpu_ms_per_call', 0):.3f} ms"
            + (f"; TorchServe behind the gateway {behind:.3f} ms" if behind is not None else "")
            + (f"; {batch:.1f} calls per TorchServe request on average" if batch else "")
        )
        others = _others_percent(ours)
        if others >= BUSY_ELSEWHERE:
            result.why.append(f"processes outside this benchmark used {machine.share(others)} CPU meanwhile")
        result.close.append(
            f"the gateway's own work per call must come to <= {limit * echo_ms:.3f} CPU ms (now "
            f"{gateway_ms:.3f}): decoding the request, the micro-batch, the TorchServe call and the reply"
        )
    return result


def _kserve_rows(
    rows: Sequence[Row], model: str, concurrency: int, per_call: int
) -> tuple[Row | None, Row | None]:
    """(oip-grpc, kserve-oip) rows of the same tensor point: the twins compared."""

    def twin(name: str) -> Row | None:
        return find(rows, name, model, concurrency=concurrency, images_per_call=per_call, inputs="tensor")

    return twin("oip-grpc"), twin("kserve-oip")


def _peer_cpu(row: Row, peer: bool) -> str:
    """``row``'s CPU ms per call by tree, for the explanation of a miss."""
    costs = row.extra.get("cpu_ms_per_call", {})
    trees = ("kserve",) if peer else ("gateway", "torchserve")
    parts = [f"{tree} {costs[tree]:.3f}" for tree in trees if tree in costs]
    return ", ".join(parts) or "not recorded"


def _explain_vs_kserve(machine: _Machine) -> Explain:
    def explain(ours: Row, theirs: Row, result: TargetResult, required: float) -> None:
        for label, row, peer in (("gateway (oip-grpc)", ours, False), ("KServe (kserve-oip)", theirs, True)):
            result.why.append(
                f"{label}: {row.throughput_img_s:.0f} img/s, mean call {row.mean_ms:.2f} ms, CPU ms per "
                f"call: {_peer_cpu(row, peer)}, machine CPU {machine.share(row.machine_cpu_percent or 0)}"
            )
        ours_ms = sum(cpu_ms_per_call(ours, tree) or 0.0 for tree in ("gateway", "torchserve"))
        theirs_ms = cpu_ms_per_call(theirs, "kserve") or 0.0
        if machine.saturated(ours) and ours_ms:
            allowed = ours_ms * (ours.throughput_img_s or 0) / (required * (theirs.throughput_img_s or 1))
            result.close.append(
                "the machine was saturated: with the CPU this point got, the gateway and TorchServe "
                f"together must spend <= {allowed:.3f} CPU ms per call (now {ours_ms:.3f}; KServe "
                f"{theirs_ms:.3f})"
            )
        else:
            wanted = required * (theirs.throughput_img_s or 0) / ours.images_per_call  # calls per second
            result.close.append(
                f"CPU did not bound this point: {ours.concurrency} closed-loop clients at {wanted:.0f} "
                f"calls/s need a mean call of <= {1000.0 * ours.concurrency / (wanted or 1):.2f} ms "
                f"(now {ours.mean_ms:.2f})"
            )

    return explain


def _kserve_targets(
    rows: Sequence[Row], model: str, machine: _Machine, skipped: str | None
) -> list[TargetResult]:
    targets = []
    batched = _batched_call(rows, model, name="oip-grpc", inputs="tensor")
    for (concurrency, size), required in VS_KSERVE.items():
        per_call = (batched or 0) if size is None else size
        ours, theirs = _kserve_rows(rows, model, concurrency, per_call)
        calls = f"{per_call} image{'s' * (per_call != 1)} per call" if per_call else "batched calls"
        target = _ratio_target(
            f"kserve-{model}-c{concurrency}-{'batched' if size is None else size}",
            f"{title(model)}, FP32 tensors over OIP gRPC, {calls}, {concurrency} client"
            f"{'s' * (concurrency != 1)}: gateway >= {required:.1f}x KServe",
            ours,
            theirs,
            required,
            _explain_vs_kserve(machine),
        )
        targets.append(target)
    ours, theirs = _kserve_rows(rows, model, 1, 1)
    limit = KSERVE_P50_FACTOR
    latency = TargetResult(
        f"kserve-{model}-p50-c1",
        f"{title(model)}, FP32 tensors over OIP gRPC, 1 image per call, 1 client: gateway p50 <= {limit:g}x "
        "KServe's",
        f"<= {limit:.2f}x",
        None,
        "x",
        None,
    )
    if ours is not None and theirs is not None and theirs.p50_ms > 0:
        ratio = ours.p50_ms / theirs.p50_ms
        latency.measured, latency.met = round(ratio, 3), ratio <= limit
        latency.figures = f"{ours.p50_ms:.2f} vs {theirs.p50_ms:.2f} ms"
        if not latency.met:
            latency.shortfall = (
                f"{ratio:.2f}x instead of <= {limit:.2f}x: {ours.p50_ms - limit * theirs.p50_ms:.2f} ms over"
            )
            latency.why.append(
                f"CPU ms per call: gateway path {_peer_cpu(ours, False)}; KServe {_peer_cpu(theirs, True)}"
            )
            latency.close.append(f"a 1-client call must take <= {limit * theirs.p50_ms:.2f} ms at the median")
    targets.append(latency)
    for target in targets:
        if target.met is None and skipped:
            target.figures = f"kserve-oip skipped: {skipped}"
    # AlexNet runs fewer twin points: list only those its run measured (LeNet's always show).
    return [t for t in targets if model == "lenet" or t.met is not None]


def _batched_call(rows: Sequence[Row], model: str, name: str = "gateway", inputs: str = "png") -> int | None:
    """Images per call of the run's batched ``name`` point for ``model`` (``inputs``), if it had one."""
    sizes = [
        r.images_per_call
        for r in rows
        if r.name == name and r.model == model and r.images_per_call > 1 and r.inputs == inputs
    ]
    return max(sizes) if sizes else None


def evaluate_targets(
    rows: Sequence[Row], cores: int | None = None, skipped: dict[str, str] | None = None
) -> list[TargetResult]:
    """Every target against ``rows`` (one run); ``cores``: the machine's, as ``results.json`` records them;
    ``skipped``: scenario -> why the run has no rows of it (shown beside the targets it leaves unmeasured)."""
    machine = _Machine(cores)
    single = [r.concurrency for r in rows if r.name == "gateway" and r.images_per_call == 1]
    c = max(single, default=None)
    gateway_c = (
        find(rows, "gateway", "lenet", concurrency=c, images_per_call=1, batching="off") if c else None
    )
    clients = f"{c} clients" if c else "the highest concurrency"
    targets = [
        _ratio_target(
            "gateway-vs-torchserve-grpc",
            f"LeNet, 1 image per call, {clients}: gateway >= {GATEWAY_VS_TORCHSERVE:.1f}x torchserve-grpc "
            "(batching on)",
            gateway_c,
            find(rows, "torchserve-grpc", "lenet", concurrency=c, batching="on") if c else None,
            GATEWAY_VS_TORCHSERVE,
            _explain_cpu_bound("torchserve-grpc", rows, machine),
        ),
        _ratio_target(
            "gateway-vs-grpc-echo",
            f"LeNet, 1 image per call, {clients}: gateway >= {GATEWAY_VS_ECHO:.1f}x grpc-echo",
            gateway_c,
            find(rows, "grpc-echo", "lenet", concurrency=c) if c else None,
            GATEWAY_VS_ECHO,
            _explain_cpu_bound("grpc-echo", rows, machine),
        ),
    ]
    for model, required in BATCHED_CALL.items():
        per_call = _batched_call(rows, model)
        size = f"{per_call} images per call" if per_call else "batched calls"
        targets.append(
            _ratio_target(
                f"{model}-batched-call",
                f"{title(model)}, {size}: gateway >= {required:.1f}x ort-inprocess at the same batch",
                find(rows, "gateway", model, images_per_call=per_call, batching="off") if per_call else None,
                find(rows, "ort-inprocess", model, images_per_call=per_call) if per_call else None,
                required,
                _explain_batched_call(model, per_call or 0, rows, machine),
            )
        )
    levels = sorted({r.concurrency for r in rows if r.name == "grpc-echo" and r.model == "lenet"}) or [
        c or 64
    ]
    why_not = (skipped or {}).get("kserve-oip")
    return [
        *targets,
        *(_cpu_per_call_target(rows, level, machine) for level in levels),
        *_kserve_targets(rows, "lenet", machine, why_not),
        *_kserve_targets(rows, "alexnet", machine, why_not),
        _latency_target(rows, "lenet", machine),
        _latency_target(rows, "alexnet", machine),
        _finetune_target(rows),
        _cold_start_target(rows),
    ]
