"""Datasets cnnserve trains on, all readable offline.

Every dataset is loaded into memory as uint8 images ``(N, C, H, W)`` plus int64 targets; preprocessing to
the model's input (:func:`cnnserve.preprocess.prepare_images`) happens per batch, the same way serving
does it.

==================  ===========================================================================
``digits``          scikit-learn's bundled 8x8 handwritten digits (1,797 images), seeded 75/25 split
``fashion-mnist``   the Debian package ``dataset-fashion-mnist`` (70,000 images), or ``--data-dir``
``mnist``           torchvision's MNIST under ``--data-dir``; downloads only with ``--download``
``cifar10``         torchvision's CIFAR-10 under ``--data-dir``; downloads only with ``--download``
``folder:PATH``     an image folder, one sub-folder per class (``train/`` and ``test/`` splits if present)
==================  ===========================================================================
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnserve.errors import FailedPreconditionError, InvalidInputError
from cnnserve.preprocess import decode_image

__all__ = [
    "ImageData",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "load_dataset",
    "read_idx",
]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "folder:PATH")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    """A dataset in memory: uint8 images ``(N, C, H, W)`` and int64 targets ``(N,)`` per split."""

    name: str
    source: str
    labels: list[str]
    train_images: torch.Tensor
    train_targets: torch.Tensor
    test_images: torch.Tensor
    test_targets: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> ImageData:
        """A seeded random subset of each split (``None`` keeps a split whole)."""
        generator = torch.Generator().manual_seed(seed)

        def pick(images: torch.Tensor, targets: torch.Tensor, count: int | None) -> tuple[torch.Tensor, ...]:
            if count is None or count >= len(targets):
                return images, targets
            index = torch.randperm(len(targets), generator=generator)[:count]
            return images[index], targets[index]

        train_images, train_targets = pick(self.train_images, self.train_targets, train)
        test_images, test_targets = pick(self.test_images, self.test_targets, test)
        return ImageData(
            self.name, self.source, self.labels, train_images, train_targets, test_images, test_targets
        )


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    channels: int = 1,
    folder_size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> ImageData:
    """Load a dataset by name (see the module docstring); ``channels``/``folder_size`` apply to folders."""
    if name == "digits":
        return _load_digits(seed)
    if name == "fashion-mnist":
        return _load_fashion_mnist(Path(data_dir) if data_dir else FASHION_MNIST_DIR)
    if name in ("mnist", "cifar10"):
        return _load_torchvision(name, data_dir, download)
    if name.startswith("folder:"):
        return _load_folder(Path(name.removeprefix("folder:")), channels, folder_size, seed)
    raise InvalidInputError.for_field("dataset", f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")


def _load_digits(seed: int) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are ink counts 0..16; scale to 0..255 like any 8-bit grey image.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]  # (1797, 1, 8, 8)
    targets = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, targets, test_size=0.25, random_state=seed, stratify=targets
    )
    return ImageData(
        name="digits",
        source="sklearn.datasets.load_digits (bundled with scikit-learn)",
        labels=[str(d) for d in range(10)],
        train_images=torch.from_numpy(train_x),
        train_targets=torch.from_numpy(train_y),
        test_images=torch.from_numpy(test_x),
        test_targets=torch.from_numpy(test_y),
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        data = stream.read()
    if len(data) < 4:
        raise FailedPreconditionError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise FailedPreconditionError(f"{path} is not a uint8 IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise FailedPreconditionError(f"{path} is truncated: {body.size} values for shape {dims}")
    return body.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    return None


def _load_fashion_mnist(directory: Path) -> ImageData:
    stems = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    paths = [_find_idx(directory, stem) for stem in stems]
    missing = [stem for stem, path in zip(stems, paths, strict=True) if path is None]
    if missing:
        raise FailedPreconditionError(
            f"Fashion-MNIST not found in {directory} (missing {', '.join(missing)}): install it with "
            "`sudo apt-get install dataset-fashion-mnist`, or pass --data-dir DIR holding the four IDX files"
        )
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths if p is not None)
    return ImageData(
        name="fashion-mnist",
        source=str(directory),
        labels=list(FASHION_MNIST_LABELS),
        train_images=torch.from_numpy(train_x.copy())[:, None],  # (60000, 1, 28, 28)
        train_targets=torch.from_numpy(train_y.astype(np.int64)),
        test_images=torch.from_numpy(test_x.copy())[:, None],  # (10000, 1, 28, 28)
        test_targets=torch.from_numpy(test_y.astype(np.int64)),
    )


def _load_torchvision(name: str, data_dir: str | Path | None, download: bool) -> ImageData:
    if data_dir is None:
        raise FailedPreconditionError(
            f"{name} needs --data-dir DIR: the folder holding torchvision's copy of it "
            "(add --download to fetch it there; that needs internet)"
        )
    from torchvision import datasets

    constructor = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    try:
        train = constructor(str(data_dir), train=True, download=download)
        test = constructor(str(data_dir), train=False, download=download)
    except RuntimeError as exc:
        hint = "" if download else " Add --download to fetch it (needs internet)."
        raise FailedPreconditionError(f"{name} not found under {data_dir}: {exc}.{hint}") from None

    def as_nchw(data: object) -> torch.Tensor:
        array = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
        return array[:, None] if array.dim() == 3 else array.permute(0, 3, 1, 2).contiguous()

    return ImageData(
        name=name,
        source=f"torchvision.datasets.{constructor.__name__} at {data_dir}",
        labels=[str(c) for c in train.classes],
        train_images=as_nchw(train.data),
        train_targets=torch.as_tensor(np.asarray(train.targets), dtype=torch.int64),
        test_images=as_nchw(test.data),
        test_targets=torch.as_tensor(np.asarray(test.targets), dtype=torch.int64),
    )


def _read_class_folders(
    root: Path, channels: int, size: tuple[int, int]
) -> tuple[list[str], list[torch.Tensor], list[int]]:
    import torch.nn.functional as F

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images: list[torch.Tensor] = []
    targets: list[int] = []
    for index, label in enumerate(classes):
        for file in sorted((root / label).rglob("*")):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                image = decode_image(file.read_bytes(), channels)
            except InvalidInputError as exc:
                raise FailedPreconditionError(f"{file}: {exc.message}") from None
            # Resized once here so the whole folder fits in memory as one (N, C, H, W) uint8 tensor.
            resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)
            images.append(resized[0].round().clamp(0, 255).to(torch.uint8))
            targets.append(index)
    return classes, images, targets


def _load_folder(root: Path, channels: int, size: tuple[int, int], seed: int) -> ImageData:
    if not root.is_dir():
        raise FailedPreconditionError(f"image folder {root} does not exist")
    splits = {s: root / s for s in ("train", "test") if (root / s).is_dir()}
    if "train" in splits and "test" not in splits and (root / "val").is_dir():
        splits["test"] = root / "val"
    if set(splits) == {"train", "test"}:
        classes, train_images, train_targets = _read_class_folders(splits["train"], channels, size)
        test_classes, test_images, test_targets = _read_class_folders(splits["test"], channels, size)
        if test_classes != classes:
            raise FailedPreconditionError(f"{root}: train and test folders name different classes")
    else:
        classes, all_images, all_targets = _read_class_folders(root, channels, size)
        order = torch.randperm(len(all_images), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = len(order) - max(1, len(order) // 5)  # seeded 80/20 split
        train_images = [all_images[i] for i in order[:cut]]
        train_targets = [all_targets[i] for i in order[:cut]]
        test_images = [all_images[i] for i in order[cut:]]
        test_targets = [all_targets[i] for i in order[cut:]]
    if len(classes) < 2 or not train_images or not test_images:
        raise FailedPreconditionError(
            f"{root}: need at least two class sub-folders with images in both splits "
            f"(found classes {classes}, {len(train_images)} train and {len(test_images)} test images)"
        )
    return ImageData(
        name=f"folder:{root}",
        source=str(root),
        labels=classes,
        train_images=torch.stack(train_images),
        train_targets=torch.tensor(train_targets, dtype=torch.int64),
        test_images=torch.stack(test_images),
        test_targets=torch.tensor(test_targets, dtype=torch.int64),
    )
