"""Decode + preprocess of a batch of digit PNGs, the worker's admit and preprocess phases without the rest:
the Pillow loop (:func:`decode_image` per image) against :func:`decode_images`, in microseconds per image.

``python -m cnnserve.bench.decode_profile [--count 64] [--threads 1] [--profile]`` prints one line per path:
the calling thread's CPU time (``time.thread_time``, so time spent waiting for a core on a shared machine
is left out; with one torch thread that is all the work), best of ``--rounds`` rounds of ``--calls`` calls.
With ``--profile``, cProfile's top functions of the new path. Both paths must give the same model inputs,
bit for bit, or it stops.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _best_us_per_image(call: Callable[[], object], images: int, calls: int, rounds: int) -> float:
    call()  # warm-up: torchvision's lazy import, allocator pools
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(calls):
            call()
        best = min(best, (time.thread_time() - started) / calls)
    return best / images * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=64, help="digit PNGs per call (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--calls", type=int, default=50, help="calls per timed round (default 50)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; the best counts (default 7)")
    parser.add_argument("--profile", action="store_true", help="cProfile the new path, top 15 by own time")
    args = parser.parse_args(argv)

    import torch

    from cnnserve.bench.scenarios import sample_images
    from cnnserve.models import get_spec
    from cnnserve.preprocess import Preprocessing, decode_image, decode_images, prepare_decoded

    torch.set_num_threads(args.threads)
    spec = get_spec("lenet")
    pre = Preprocessing(spec.in_channels, spec.resize, spec.pad, spec.default_mean, spec.default_std)
    pngs = sample_images(args.count).png

    def pillow_decode() -> list[torch.Tensor]:
        return [decode_image(data, pre.channels) for data in pngs]

    def fast_decode() -> list[torch.Tensor]:
        decoded = decode_images(pngs, pre.channels)
        assert all(isinstance(image, torch.Tensor) for image in decoded)
        return decoded  # type: ignore[return-value]

    before, after = prepare_decoded(pillow_decode(), pre), prepare_decoded(fast_decode(), pre)
    if not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        raise SystemExit("decode_images and the Pillow loop gave different model inputs")

    decoded = fast_decode()
    timings: dict[str, Callable[[], object]] = {
        "pillow loop: decode": pillow_decode,
        "pillow loop: decode + prepare_decoded": lambda: prepare_decoded(pillow_decode(), pre),
        "decode_images: decode": fast_decode,
        "prepare_decoded alone": lambda: prepare_decoded(decoded, pre),
        "decode_images: decode + prepare_decoded": lambda: prepare_decoded(fast_decode(), pre),
    }
    print(f"{len(pngs)} digit PNGs per call, torch threads {torch.get_num_threads()}, best of {args.rounds}")
    for name, call in timings.items():
        per_image = _best_us_per_image(call, len(pngs), args.calls, args.rounds)
        print(f"  {name:<42} {per_image:8.1f} us/image  {per_image * len(pngs) / 1000:6.3f} ms/call")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls * 4):
            prepare_decoded(fast_decode(), pre)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
