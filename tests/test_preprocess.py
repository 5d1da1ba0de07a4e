"""Decoding and preprocessing: the one path training and serving share."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnnserve.errors import InvalidInputError
from cnnserve.preprocess import (
    Preprocessing,
    decode_image,
    decode_tensor,
    encode_png,
    prepare_decoded,
    prepare_images,
)
from tests.helpers import png_bytes

LENET = Preprocessing(channels=1, resize=(28, 28), pad=2, mean=(0.5,), std=(0.25,))
ALEXNET = Preprocessing(channels=3, resize=(224, 224), pad=0, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))


def test_prepare_images_resizes_pads_and_normalises() -> None:
    images = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    batch = prepare_images(images, LENET)
    assert batch.shape == (2, 1, 32, 32)
    assert batch.dtype == torch.float32
    # interior: (1.0 - 0.5) / 0.25 = 2; the 2-pixel zero border: (0 - 0.5) / 0.25 = -2
    assert torch.allclose(batch[:, :, 2:30, 2:30], torch.full((2, 1, 28, 28), 2.0))
    assert torch.allclose(batch[:, :, :2, :], torch.full((2, 1, 2, 32), -2.0))


def test_prepare_images_grey_to_colour_and_back() -> None:
    grey = torch.full((1, 1, 28, 28), 102, dtype=torch.uint8)  # 0.4
    colour = prepare_images(grey, ALEXNET)
    assert colour.shape == (1, 3, 224, 224)
    assert torch.allclose(colour[0, 0], torch.zeros(224, 224), atol=1e-5)  # (0.4 - 0.4) / 0.2
    rgb = torch.zeros((1, 3, 28, 28), dtype=torch.uint8)
    rgb[:, 1] = 255  # pure green -> luma 0.587
    assert torch.allclose(prepare_images(rgb, LENET, normalize=False)[0, 0, 10, 10], torch.tensor(0.587))


def test_prepare_images_rejects_non_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        prepare_images(torch.zeros((1, 1, 8, 8)), LENET)


def test_decode_png_grey_and_rgb() -> None:
    array = np.arange(64, dtype=np.uint8).reshape(8, 8)
    grey = decode_image(png_bytes(array), channels=1)
    assert grey.shape == (1, 8, 8)
    assert torch.equal(grey[0], torch.from_numpy(array))
    rgb = decode_image(png_bytes(array), channels=3)
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[2], torch.from_numpy(array))


def test_decode_jpeg_and_rgba() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(buffer, format="JPEG")
    assert decode_image(buffer.getvalue(), channels=3).shape == (3, 10, 20)
    rgba = np.zeros((5, 5, 4), dtype=np.uint8)
    assert decode_image(png_bytes(rgba), channels=1).shape == (1, 5, 5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty body"),
        (b"definitely not an image", "not an image"),
        (png_bytes(np.zeros((64, 64), dtype=np.uint8))[:60], "truncated"),
    ],
)
def test_decode_bad_images(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as caught:
        decode_image(data, channels=1)
    assert caught.value.violations[0].field == "image"


def test_decode_refuses_huge_images() -> None:
    with pytest.raises(InvalidInputError, match="larger than the limit"):
        decode_image(png_bytes(np.zeros((100, 100), dtype=np.uint8)), channels=1, max_pixels=5_000)


def test_decode_tensor() -> None:
    values = np.random.default_rng(0).standard_normal((1, 32, 32)).astype("<f4")
    tensor = decode_tensor(values.tobytes(), [1, 32, 32], (1, 32, 32))
    assert torch.equal(tensor, torch.from_numpy(values))
    assert decode_tensor(values.tobytes(), [1, 1, 32, 32], (1, 32, 32)).shape == (1, 32, 32)


@pytest.mark.parametrize(
    ("data", "shape", "message"),
    [
        (np.zeros(100, "<f4").tobytes(), [1, 32, 32], "do not match shape"),
        (np.zeros(1024, "<f4").tobytes(), [1, 16, 64], "does not match the model's input shape"),
        (np.full(1024, np.nan, "<f4").tobytes(), [1, 32, 32], "NaN or Inf"),
        (np.full(1024, np.inf, "<f4").tobytes(), [1, 32, 32], "NaN or Inf"),
        (b"", [0, 32, 32], "not a valid shape"),
    ],
)
def test_decode_bad_tensors(data: bytes, shape: list[int], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_tensor(data, shape, (1, 32, 32))


def test_prepare_decoded_batches_by_size_and_keeps_order() -> None:
    seeded = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=seeded)
    large = torch.randint(0, 256, (1, 20, 12), dtype=torch.uint8, generator=seeded)
    tensor = torch.randn(1, 1, 32, 32, generator=seeded)
    prepared = prepare_decoded([small, tensor, large, small], LENET)
    assert [p.shape for p in prepared] == [(1, 1, 32, 32)] * 4
    # The two smalls are resized as one batch of 2: equal to one alone up to float32 kernel differences.
    torch.testing.assert_close(prepared[0], prepare_images(small[None], LENET))
    assert torch.equal(prepared[1], tensor)
    torch.testing.assert_close(prepared[2], prepare_images(large[None], LENET))
    assert torch.equal(prepared[3], prepared[0])  # rows of one batch: the same computation


@pytest.mark.parametrize("channels", [1, 3])
def test_encode_png_round_trips_through_decode_image(channels: int) -> None:
    image = torch.randint(
        0, 256, (channels, 9, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    data = encode_png(image)
    assert data.startswith(b"\x89PNG")
    assert torch.equal(decode_image(data, channels), image)
