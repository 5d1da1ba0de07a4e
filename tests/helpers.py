"""Small helpers shared by tests."""

from __future__ import annotations


def png_bytes(array: object) -> bytes:
    """Encode a uint8 HxW or HxWxC array as PNG."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
