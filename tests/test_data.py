"""Datasets load offline, split reproducibly, and fail with a message that says what to do."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnserve.errors import FailedPreconditionError, InvalidInputError
from cnnserve_export.data import FASHION_MNIST_DIR, ImageData, load_dataset, read_idx
from tests.helpers import png_bytes

REQUIRE_DATASETS = os.environ.get("CNNSERVE_REQUIRE_DATASETS") == "1"


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def test_digits_split_is_fixed_and_seeded(digits: ImageData) -> None:
    assert len(digits.train_targets) + len(digits.test_targets) == 1797
    assert len(digits.test_targets) == 450
    assert digits.train_images.shape[1:] == (1, 8, 8)
    assert digits.train_images.dtype == torch.uint8 and int(digits.train_images.max()) == 255
    assert torch.equal(load_dataset("digits").test_targets, digits.test_targets)
    assert not torch.equal(load_dataset("digits", seed=1).test_targets, digits.test_targets)


def test_fashion_mnist_from_the_debian_package() -> None:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists() and not REQUIRE_DATASETS:
        pytest.skip("dataset-fashion-mnist is not installed (make setup installs it where apt can)")
    data = load_dataset("fashion-mnist")
    assert data.train_images.shape == (60000, 1, 28, 28)
    assert data.test_images.shape == (10000, 1, 28, 28)
    assert data.labels[9] == "Ankle boot"
    assert sorted(torch.bincount(data.test_targets).tolist()) == [1000] * 10


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_from_a_data_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (4, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert data.train_images.shape == (6, 1, 28, 28)
    assert data.test_targets.tolist() == [0, 1, 2, 3]


def test_read_idx_rejects_truncated_files(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 2, 28, 28) + b"\x00" * 10)
    with pytest.raises(FailedPreconditionError, match="truncated"):
        read_idx(path)


def test_torchvision_datasets_need_a_dir_and_never_download_unasked(tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(FailedPreconditionError, match="--download"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [] or all(p.is_dir() for p in tmp_path.iterdir())


def test_unknown_dataset() -> None:
    with pytest.raises(InvalidInputError, match="unknown dataset"):
        load_dataset("imagenet")


def test_image_folder(tmp_path: Path) -> None:
    for label, value in (("cat", 30), ("dog", 220)):
        (tmp_path / label).mkdir()
        for i in range(5):
            (tmp_path / label / f"{i}.png").write_bytes(png_bytes(np.full((12, 9, 3), value + i)))
    data = load_dataset(f"folder:{tmp_path}", channels=1, folder_size=(28, 28))
    assert data.labels == ["cat", "dog"]
    assert len(data.train_targets) == 8 and len(data.test_targets) == 2
    assert data.train_images.shape[1:] == (1, 28, 28)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.png").write_bytes(png_bytes(np.zeros((4, 4))))
    with pytest.raises(FailedPreconditionError, match="at least two class"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.png").write_bytes(b"not a png")
    with pytest.raises(FailedPreconditionError, match=r"b\.png"):
        load_dataset(f"folder:{tmp_path}")
