"""Weights on disk: safetensors files with their sha256, written atomically."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cnnserve.errors import FailedPreconditionError

__all__ = ["sha256_file", "save_weights", "load_weights", "load_into", "read_metadata"]


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> str:
    """Write ``state`` as safetensors via a temporary file and a rename; returns the file's sha256.

    Readers never see a half-written file: the rename is atomic, and the data is fsynced before it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    contiguous = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    save_file(contiguous, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # readable by TorchServe workers running as another user
    with open(tmp, "rb") as stream:
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def load_weights(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, refusing it when its sha256 is not the expected one."""
    path = Path(path)
    if not path.exists():
        raise FailedPreconditionError(f"weights file {path} not found")
    if expected_sha256:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise FailedPreconditionError(
                f"weights file {path} has sha256 {actual[:12]}…, expected {expected_sha256[:12]}…: "
                "the file was changed or corrupted"
            )
    return load_file(str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` into ``model`` strictly (every key must match) and return the model."""
    model.load_state_dict(state, strict=True)
    return model
