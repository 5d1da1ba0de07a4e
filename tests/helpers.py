"""Small helpers shared by tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


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
