"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# Tolerances on float32 probabilities (softmax outputs), in one table as torchvision keeps its per-model
# ones. Different batch sizes, call paths, thread counts and CPUs (AVX2, AVX-512, AMX) run different kernels,
# whose results differ in the last bits: compare by class index within these, never exactly.
PROBABILITY_ATOL = 1e-5  # one runtime, another batch size or call path (torch.testing's float32 atol)
# ONNX Runtime or TorchScript against eager PyTorch: the export gate bounds their logits to 1e-4 apart, which
# bounds softmax outputs to half that (|dp_i| <= 2 p_i (1 - p_i) max|dz|).
RUNTIME_PROBABILITY_ATOL = 5e-5


def cnnserve(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the console script (``python -m cnnserve.cli``) as a user would; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "cnnserve.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def png_bytes(array: object) -> bytes:
    """Encode a uint8 HxW or HxWxC array as PNG."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- comparing probabilities ------------------------------------------------------------------------------


def top1_margin(probabilities: Any) -> Any:
    """Best minus runner-up along the last axis: where it is within twice a tolerance, top-1 is a near tie."""
    import numpy as np

    best_two = np.sort(np.asarray(probabilities, dtype=np.float64), axis=-1)[..., -2:]
    return best_two[..., 1] - best_two[..., 0]


def by_class(scores: Sequence[tuple[int, float]], num_classes: int) -> Any:
    """A reply's (index, probability) pairs as one probability per class, in class order (all present)."""
    import numpy as np

    row = np.full(num_classes, np.nan)
    for index, probability in scores:
        row[index] = probability
    assert not np.isnan(row).any(), f"the reply lists {len(scores)} of {num_classes} classes"
    return row


def assert_probabilities_close(got: Any, expected: Any, atol: float = PROBABILITY_ATOL) -> None:
    """Probability rows compared class by class within ``atol``; their top-1 wherever its margin is clear.

    (Within ``atol`` everywhere already implies the same top-1 where the margin exceeds ``2 * atol``; the
    second check says so in its message.)
    """
    import numpy as np

    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    clear = top1_margin(expected) > 2 * atol
    np.testing.assert_array_equal(got.argmax(-1)[clear], expected.argmax(-1)[clear], "top-1 (clear margins)")


def assert_top_k(scores: Sequence[tuple[int, float]], expected: Any, atol: float = PROBABILITY_ATOL) -> None:
    """One reply's top-k (index, probability) pairs against the expected probabilities of every class.

    Each listed probability is its class's expected one within ``atol``; the classes are distinct and listed
    from likeliest down; they are a top-k of ``expected`` up to near ties (no class left out is likelier than
    a listed one by more than ``2 * atol``); and the first is the expected top-1 where that is clear.
    """
    import numpy as np

    expected = np.asarray(expected, dtype=np.float64)
    indices = [index for index, _ in scores]
    listed = np.array([probability for _, probability in scores], dtype=np.float64)
    assert indices and len(set(indices)) == len(indices), indices
    np.testing.assert_allclose(listed, expected[indices], rtol=0, atol=atol)
    assert (np.diff(listed) <= 0).all(), f"not listed likeliest first: {scores}"
    left_out = np.delete(expected, indices)
    if left_out.size:
        assert left_out.max() <= expected[indices].min() + 2 * atol, (scores, expected.tolist())
    if top1_margin(expected) > 2 * atol:
        assert indices[0] == int(expected.argmax()), (scores, expected.tolist())


# ---- conditions instead of sleeps -------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.001
) -> None:
    """:func:`wait_until` for a coroutine: polls without blocking its event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the count it had.

    Bit-identical float results (training twice to the same sha256) hold only for the same kernels and thread
    count: a reduction split another way sums in another order.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_certificate(
    directory: Path, names: str = "IP:127.0.0.1,DNS:localhost", stem: str = "gateway"
) -> tuple[Path, Path]:
    """A self-signed certificate and its key (PEM) for ``names``, a subjectAltName value."""
    cert, key = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=cnnserve",
         "-addext", f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
