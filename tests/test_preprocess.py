"""Decoding and preprocessing: the one path training and serving share."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cnnserve import preprocess
from cnnserve.errors import InvalidInputError
from cnnserve.preprocess import (
    Preprocessing,
    decode_image,
    decode_images,
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


# ---- decode_images: the libpng fast path gives Pillow's pixels, and Pillow's errors ------------------------
#
# Pillow cannot write interlaced or sub-byte grey PNGs, so _png below writes them (every filter type, Adam7);
# test_the_test_encoder_matches_pillow checks it against Pillow. Each case also says whether decode_images may
# decode it itself (fast) or must hand it to decode_image: the pillow_calls fixture records which it did, so a
# fast path that silently fell back everywhere would fail.

_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each colour type


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _filtered(rows: list[bytes], bpp: int) -> bytes:
    """Each row with a filter byte in front, cycling through None, Sub, Up, Average, Paeth."""
    out, prior = bytearray(), bytes(len(rows[0]) if rows else 0)
    for number, row in enumerate(rows):
        kind = number % 5
        out.append(kind)
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prior[i]
            c = prior[i - bpp] if i >= bpp else 0
            predictor = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
            out.append((x - predictor) % 256)
        prior = row
    return bytes(out)


def _packed(samples: np.ndarray, depth: int) -> bytes:
    """One row of samples (W, C) at a bit depth: big-endian 16-bit, or sub-byte packed from the high bits."""
    flat = samples.reshape(-1).astype(np.uint32)
    if depth == 16:
        return flat.astype(">u2").tobytes()
    if depth == 8:
        return flat.astype(np.uint8).tobytes()
    per_byte = 8 // depth
    padded = np.zeros(-(-len(flat) // per_byte) * per_byte, np.uint32)
    padded[: len(flat)] = flat
    shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint32) * depth
    return (padded.reshape(-1, per_byte) << shifts).sum(axis=1).astype(np.uint8).tobytes()


def _png(
    samples: np.ndarray,
    depth: int,
    colour: int,
    *,
    interlace: bool = False,
    palette: bytes | None = None,
    trns: bytes | None = None,
    before: bytes = b"",
    after: bytes = b"",
    split: int = 0,
) -> bytes:
    """``samples`` (H, W, C) as a PNG; ``before``/``after`` are chunks placed before/after the image data,
    ``split`` cuts the compressed data into IDAT chunks of that many bytes."""
    height, width = samples.shape[:2]
    bpp = max(1, samples.shape[2] * depth // 8)
    if interlace:
        data = b"".join(
            _filtered([_packed(row, depth) for row in samples[y0::dy, x0::dx]], bpp)
            for x0, y0, dx, dy in _ADAM7
            if samples[y0::dy, x0::dx].size
        )
    else:
        data = _filtered([_packed(row, depth) for row in samples], bpp)
    compressed = zlib.compress(data)
    step = split or len(compressed)
    idat = b"".join(_chunk(b"IDAT", compressed[i : i + step]) for i in range(0, len(compressed), step))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace))
    extra = (_chunk(b"PLTE", palette) if palette else b"") + (_chunk(b"tRNS", trns) if trns else b"")
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + before + idat + after + _chunk(b"IEND", b"")
    )


def _samples(
    height: int, width: int, colour: int, depth: int, seed: int, top: int | None = None
) -> np.ndarray:
    top = (1 << depth) if top is None else top
    rng = np.random.default_rng(seed)
    return rng.integers(0, top, (height, width, _CHANNELS[colour]), dtype=np.int64)


def _palette(entries: int, seed: int) -> bytes:
    return (
        np.random.default_rng(seed).integers(0, 256, entries * 3, dtype=np.int64).astype(np.uint8).tobytes()
    )


def _pillow_png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _pillow_images() -> list[tuple[str, bytes, bool]]:
    rng = np.random.default_rng(7)
    rgba = Image.fromarray(rng.integers(0, 256, (11, 17, 4), dtype=np.int64).astype(np.uint8), "RGBA")
    rgb = rgba.convert("RGB")
    quantized = rgb.quantize(colors=12)
    transparent = quantized.copy()
    transparent.info["transparency"] = 3
    alphas = quantized.copy()
    alphas.info["transparency"] = bytes(range(0, 240, 20))
    cases = [
        ("pillow 1", rgb.convert("1"), {}, True),
        ("pillow L", rgb.convert("L"), {}, True),
        ("pillow LA", rgba.convert("LA"), {}, True),
        ("pillow RGB", rgb, {}, True),
        ("pillow RGB optimized", rgb, {"optimize": True}, True),
        ("pillow RGBA", rgba, {}, True),
        ("pillow P", quantized, {}, True),
        ("pillow P 4-bit", quantized, {"bits": 4}, True),
        ("pillow P 2-bit", rgb.quantize(colors=4), {"bits": 2}, True),
        ("pillow P transparency index", transparent, {}, True),
        ("pillow P transparency bytes", alphas, {}, True),
        ("pillow L with text and dpi", rgb.convert("L"), {"dpi": (72, 72), "pnginfo": _text_info()}, True),
        (
            "pillow I;16",
            Image.fromarray(rng.integers(0, 65536, (5, 6), dtype=np.int64).astype(np.uint16)),
            {},
            False,
        ),
    ]
    return [(name, _pillow_png(image, **options), fast) for name, image, options, fast in cases]


def _text_info() -> object:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "cnnserve tests")
    return info


def _icc_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _written_images() -> list[tuple[str, bytes, bool]]:
    cases: list[tuple[str, bytes, bool]] = []
    for colour, depths in ((0, (1, 2, 4, 8, 16)), (2, (8, 16)), (4, (8, 16)), (6, (8, 16))):
        for depth in depths:
            for interlace in (False, True):
                for height, width in ((7, 13), (1, 1), (3, 2), (1, 9), (10, 1)):
                    samples = _samples(height, width, colour, depth, seed=height * 31 + width + depth)
                    name = f"type {colour} {depth}-bit {height}x{width}{' Adam7' if interlace else ''}"
                    cases.append((name, _png(samples, depth, colour, interlace=interlace), depth != 16))
    for depth in (1, 2, 4, 8):
        full = 1 << depth
        for interlace in (False, True):
            samples = _samples(9, 11, 3, depth, seed=depth)
            suffix = " Adam7" if interlace else ""
            cases.append(
                (
                    f"palette {depth}-bit full{suffix}",
                    _png(samples, depth, 3, interlace=interlace, palette=_palette(full, depth)),
                    True,
                )
            )
        # indices past the palette's end (Pillow and libpng both give black) and a tRNS per entry
        short = max(1, full // 2 - 1)
        samples = _samples(6, 10, 3, depth, seed=depth + 10)
        cases.append(
            (f"palette {depth}-bit short", _png(samples, depth, 3, palette=_palette(short, 3)), True)
        )
        trns = bytes(range(255, 255 - short, -1))
        cases.append(
            (
                f"palette {depth}-bit tRNS",
                _png(samples, depth, 3, palette=_palette(short, 4), trns=trns),
                True,
            )
        )
        cases.append(
            (
                f"palette {depth}-bit one transparent",
                _png(samples, depth, 3, palette=_palette(full, 5), trns=b"\0"),
                True,
            )
        )
    grey = _samples(5, 8, 0, 8, seed=1)
    rgb = _samples(5, 8, 2, 8, seed=2)
    cases += [
        ("grey tRNS", _png(grey, 8, 0, trns=struct.pack(">H", 17)), True),
        ("grey 2-bit tRNS", _png(_samples(5, 8, 0, 2, seed=3), 2, 0, trns=struct.pack(">H", 2)), True),
        ("grey tRNS out of range", _png(grey, 8, 0, trns=struct.pack(">H", 300)), False),
        ("grey tRNS truncated", _png(grey, 8, 0, trns=b"\x01"), False),
        ("RGB tRNS", _png(rgb, 8, 2, trns=struct.pack(">3H", 1, 2, 3)), True),
        ("RGB suggested palette", _png(rgb, 8, 2, palette=_palette(16, 6)), True),
        ("split IDAT", _png(rgb, 8, 2, split=7), True),
        (
            "ancillary chunks",
            _png(
                rgb,
                8,
                2,
                before=_chunk(b"gAMA", struct.pack(">I", 45455))
                + _chunk(b"sRGB", b"\0")
                + _chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1))
                + _chunk(b"cHRM", bytes(32))
                + _chunk(b"tEXt", b"Comment\0digits")
                + _chunk(b"eXIf", b"MM\0*\0\0\0\x08\0\0")
                + _chunk(b"prIv", b"anything"),
                after=_chunk(b"tEXt", b"Author\0tests") + _chunk(b"tIME", bytes(7)),
            ),
            True,
        ),
        ("iCCP", _png(rgb, 8, 2, before=_chunk(b"iCCP", b"sRGB\0\0" + zlib.compress(_icc_profile()))), True),
        ("iCCP bad zlib", _png(rgb, 8, 2, before=_chunk(b"iCCP", b"sRGB\0\0not zlib")), True),
        (
            "iCCP unknown method",
            _png(rgb, 8, 2, before=_chunk(b"iCCP", b"sRGB\0\x01" + zlib.compress(b"x"))),
            False,
        ),
        ("zTXt", _png(rgb, 8, 2, before=_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"digits"))), False),
        ("gAMA truncated", _png(rgb, 8, 2, before=_chunk(b"gAMA", b"\0\0")), False),
        ("pHYs truncated after the image", _png(rgb, 8, 2, after=_chunk(b"pHYs", b"\0")), False),
        ("unknown critical chunk", _png(rgb, 8, 2, before=_chunk(b"CRIT", b"")), False),
        ("APNG chunk", _png(rgb, 8, 2, before=_chunk(b"acTL", struct.pack(">II", 1, 0))), False),
    ]
    return cases


def _broken_images() -> list[tuple[str, bytes, bool]]:
    rgb = _samples(6, 9, 2, 8, seed=9)
    good = _png(rgb, 8, 2)
    ihdr_end = 8 + 8 + 13 + 4
    bad_idat_crc = bytearray(good)
    bad_idat_crc[len(good) - 12 - 1] ^= 0xFF  # the last byte of IDAT's CRC: Pillow never checks it
    bad_gama_crc = bytearray(_png(rgb, 8, 2, before=_chunk(b"gAMA", struct.pack(">I", 45455))))
    bad_gama_crc[ihdr_end + 12 + 3] ^= 0xFF
    bad_late_crc = bytearray(_png(rgb, 8, 2, after=_chunk(b"tEXt", b"Late\0chunk")))
    bad_late_crc[-12 - 1] ^= 0xFF  # tEXt's CRC, after the image data: read by neither decoder
    rows = [b"\0" + bytes(row.astype(np.uint8).reshape(-1)) for row in rgb]  # filter type 0 (None)
    corrupt = bytearray(good)
    corrupt[ihdr_end + 8 + 5 : ihdr_end + 8 + 25] = bytes(20)
    return [
        ("IDAT CRC", bytes(bad_idat_crc), False),
        ("ancillary CRC before IDAT", bytes(bad_gama_crc), False),
        ("ancillary CRC after IDAT", bytes(bad_late_crc), True),
        ("corrupt image data", bytes(corrupt), False),
        ("truncated", good[: len(good) // 2], False),
        ("no IEND", good[:-12], False),
        ("trailing bytes", good + b"junk", True),
        ("IHDR larger than the data", _png_with_size(rgb, 20, 6), False),
        ("IHDR smaller than the data", _png_with_size(rgb, 5, 4), False),
        ("zero width", _png_with_size(rgb, 0, 6), False),
        ("16-bit palette", _png_with_size(rgb, 9, 6, depth=16, colour=3), False),
        ("palette without PLTE", _png(_samples(4, 4, 3, 8, seed=1), 8, 3), False),
        # libpng fails on these only once it reads the rows, which torchvision 0.29 survives badly (SIGSEGV)
        ("bad filter type", _png_of_rows(9, 6, [*rows[:3], b"\x05" + rows[3][1:], *rows[4:]]), False),
        ("too little image data", _png_of_rows(9, 6, rows[:5]), False),
        ("too much image data", _png_of_rows(9, 6, [*rows, rows[0]]), False),
        ("bad zlib checksum", _png_of_rows(9, 6, rows, adler=1), False),
    ]


def _png_of_rows(width: int, height: int, rows: list[bytes], adler: int = 0) -> bytes:
    """An 8-bit RGB PNG of the given filtered rows, its zlib checksum off by ``adler``."""
    compressed = bytearray(zlib.compress(b"".join(rows)))
    compressed[-4:] = struct.pack(">I", (int.from_bytes(compressed[-4:], "big") + adler) % (1 << 32))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", bytes(compressed))
        + _chunk(b"IEND", b"")
    )


def _png_with_size(samples: np.ndarray, width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG of ``samples`` whose IHDR claims another size (or bit depth, or colour type)."""
    data = bytearray(_png(samples, 8, 2))
    data[16:29] = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


_CASES = _pillow_images() + _written_images() + _broken_images()


@pytest.fixture
def pillow_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The inputs decode_images hands to decode_image (Pillow)."""
    calls: list[bytes] = []
    real = preprocess.decode_image

    def recording(data: bytes, channels: int, max_pixels: int = preprocess.MAX_IMAGE_PIXELS) -> torch.Tensor:
        calls.append(data)
        return real(data, channels, max_pixels)

    monkeypatch.setattr(preprocess, "decode_image", recording)
    return calls


def _pillow_outcome(data: bytes, channels: int, max_pixels: int = preprocess.MAX_IMAGE_PIXELS) -> object:
    try:
        return decode_image(data, channels, max_pixels)
    except InvalidInputError as exc:
        return exc


def _same(got: object, expected: object) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and torch.equal(got, expected)
    assert isinstance(expected, InvalidInputError)
    return isinstance(got, InvalidInputError) and got.violations == expected.violations


@pytest.mark.filterwarnings("ignore:Palette images with Transparency expressed in bytes")
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("name", "data", "fast"), _CASES, ids=[case[0] for case in _CASES])
def test_decode_images_matches_pillow(
    name: str, data: bytes, fast: bool, channels: int, pillow_calls: list[bytes]
) -> None:
    [got] = decode_images([data], channels)
    expected = _pillow_outcome(data, channels)
    assert _same(got, expected), (got, expected)
    if isinstance(got, torch.Tensor):
        assert got.shape[0] == channels
    assert pillow_calls == ([] if fast else [data])


def test_what_pillow_decodes_and_the_fast_path_leaves_to_it() -> None:
    """Apart from 16-bit samples, the images Pillow decodes and decode_images hands it: each a deliberate
    refusal (libpng would crash on or refuse the data, or Pillow's reading could differ)."""
    pillow_only = {
        name
        for name, data, fast in _CASES
        if not fast and "16-bit" not in name and isinstance(_pillow_outcome(data, 1), torch.Tensor)
    }
    assert pillow_only == {
        "pillow I;16",
        "APNG chunk",
        "IDAT CRC",
        "too little image data",  # Pillow leaves the missing rows black
        "too much image data",
        "grey tRNS out of range",
        "no IEND",
        "palette without PLTE",
        "unknown critical chunk",
        "zTXt",
    }


def test_the_test_encoder_matches_pillow() -> None:
    """_png's interlacing, packing and filters are right: Pillow reads its samples back."""
    for colour, depth in ((0, 8), (2, 8), (6, 8), (0, 1), (0, 4), (2, 16)):
        samples = _samples(9, 11, colour, depth, seed=depth)
        for interlace in (False, True):
            image = Image.open(io.BytesIO(_png(samples, depth, colour, interlace=interlace)))
            image.load()
            array = np.asarray(image)
            if depth < 8:  # Pillow scales sub-byte grey to 0..255 ("1" mode reads as bool)
                array = np.asarray(image.convert("L")).astype(np.int64) // (255 // ((1 << depth) - 1))
            if depth == 16:
                array = np.asarray(image.convert("RGB"))  # Pillow keeps the high byte of each sample
                samples_8 = samples >> 8
                assert np.array_equal(array, samples_8), (colour, depth, interlace)
                continue
            assert np.array_equal(array.reshape(samples.shape), samples), (colour, depth, interlace)


def test_the_integer_luma_is_pillows_for_every_colour() -> None:
    """All 2**24 colours: the torch integer luma equals Pillow's convert("L")."""
    every = np.arange(1 << 24, dtype=np.uint32)
    rgb = (
        np.stack([every >> 16, (every >> 8) & 255, every & 255], axis=-1)
        .astype(np.uint8)
        .reshape(4096, 4096, 3)
    )
    expected = np.array(Image.fromarray(rgb, "RGB").convert("L"))
    got = preprocess._pillow_luma(torch.from_numpy(rgb).permute(2, 0, 1)[None])  # (1, 1, 4096, 4096)
    assert torch.equal(got[0, 0], torch.from_numpy(expected))


def test_decode_images_mixed_batch(pillow_calls: list[bytes]) -> None:
    digit = encode_png(torch.arange(64, dtype=torch.uint8).reshape(1, 8, 8))
    colour = _png(_samples(8, 8, 2, 8, seed=3), 8, 2)
    jpeg = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(jpeg, format="JPEG")
    huge = _png_with_size(_samples(2, 2, 2, 8, seed=1), 5000, 5000)  # the header lies: refused from it
    inputs = [
        digit,
        b"",
        colour,
        digit[: len(digit) // 2],
        jpeg.getvalue(),
        huge,
        b"definitely not an image",
        digit,
    ]
    got = decode_images(inputs, 1)
    assert len(got) == len(inputs)
    for data, result in zip(inputs, got, strict=True):
        assert _same(result, _pillow_outcome(data, 1)), (data[:16], result)
    assert isinstance(got[5], InvalidInputError) and "5000x5000 image is larger than the limit" in str(got[5])
    assert isinstance(got[1], InvalidInputError) and "empty body" in str(got[1])
    assert [isinstance(result, torch.Tensor) for result in got] == [
        True,
        False,
        True,
        False,
        True,
        False,
        False,
        True,
    ]
    # Pillow saw the empty, truncated, JPEG and unrecognised inputs, never the good PNGs nor the huge one.
    assert pillow_calls == [b"", digit[: len(digit) // 2], jpeg.getvalue(), b"definitely not an image"]


def test_decode_images_refuses_oversized_pngs_from_the_header(pillow_calls: list[bytes]) -> None:
    data = png_bytes(np.zeros((100, 100), dtype=np.uint8))
    [got] = decode_images([data], 1, max_pixels=5_000)
    assert _same(got, _pillow_outcome(data, 1, max_pixels=5_000))
    assert pillow_calls == []
    # Past Pillow's own decompression-bomb limit it is Pillow's refusal, with Pillow's message.
    bomb = _png_with_size(_samples(2, 2, 2, 8, seed=1), 20_000, 20_000)
    [got] = decode_images([bomb], 1)
    assert _same(got, _pillow_outcome(bomb, 1)) and "decompression bomb" in str(got)
    assert pillow_calls == [bomb]


@pytest.mark.parametrize("disabled_by", ["no torchvision", "LOAD_TRUNCATED_IMAGES"])
def test_decode_images_without_the_fast_path(
    disabled_by: str, monkeypatch: pytest.MonkeyPatch, pillow_calls: list[bytes]
) -> None:
    """Without torchvision, or with Pillow told to load truncated images (its checks then differ from the ones
    the fast path relies on), every input is Pillow's."""
    inputs = [
        encode_png(torch.full((1, 4, 4), 9, dtype=torch.uint8)),
        b"",
        _png(_samples(3, 3, 2, 8, seed=0), 8, 2),
    ]
    if disabled_by == "no torchvision":
        monkeypatch.setattr(preprocess, "_libpng", lambda: None)
    else:
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    expected = [_pillow_outcome(data, 3) for data in inputs]
    pillow_calls.clear()
    got = decode_images(inputs, 3)
    assert all(_same(g, e) for g, e in zip(got, expected, strict=True))
    assert pillow_calls == inputs


def test_decode_images_feeds_prepare_decoded() -> None:
    """The sample digits end to end: the same model inputs as the Pillow loop, bit for bit."""
    images = [
        encode_png(
            torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        )
        for i in range(16)
    ]
    fast = decode_images(images, 1)
    assert all(isinstance(image, torch.Tensor) for image in fast)
    pillow = [decode_image(data, 1) for data in images]
    for got, expected in zip(prepare_decoded(fast, LENET), prepare_decoded(pillow, LENET), strict=True):  # type: ignore[arg-type]
        assert torch.equal(got, expected)


def test_decode_images_reads_memoryview_slices(pillow_calls: list[bytes]) -> None:
    """The worker's inputs are read-only memoryview slices of one request body: decoded without a warning
    (frombuffer warns on read-only memory) and without going through Pillow."""
    pngs = [_png(_samples(5, 7, colour, 8, seed=colour), 8, colour, interlace=True) for colour in (0, 2, 6)]
    blob = memoryview(b"head" + b"".join(pngs)).toreadonly()
    views, offset = [], 4
    for png in pngs:
        views.append(blob[offset : offset + len(png)])
        offset += len(png)
    for channels in (1, 3):
        got = decode_images(views, channels)
        for result, png in zip(got, pngs, strict=True):
            assert _same(result, _pillow_outcome(png, channels))
    assert pillow_calls == []
    assert torch.equal(decode_image(views[1], 3), decode_image(pngs[1], 3))


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_images_batches_colour_conversion_by_size_in_order(
    channels: int, pillow_calls: list[bytes]
) -> None:
    """Grey, RGB, RGBA and palette PNGs of three sizes, interleaved: each slot gets its own image."""
    inputs = [
        _png(
            _samples(height, width, colour, 8, seed=seed),
            8,
            colour,
            palette=_palette(256, seed) if colour == 3 else None,
        )
        for seed, (colour, (height, width)) in enumerate(
            (colour, size) for size in ((4, 4), (9, 5), (4, 4), (2, 7)) for colour in (2, 0, 6, 3)
        )
    ]
    got = decode_images(inputs, channels)
    assert all(_same(g, _pillow_outcome(data, channels)) for g, data in zip(got, inputs, strict=True))
    assert pillow_calls == []


def test_decode_images_leaves_other_channel_counts_to_pillow(pillow_calls: list[bytes]) -> None:
    data = _png(_samples(3, 4, 0, 8, seed=0), 8, 0)
    [got] = decode_images([data], 2)  # decode_image reads anything but 1 channel as RGB
    assert _same(got, _pillow_outcome(data, 2)) and pillow_calls == [data]


def _with_fixed_crcs(data: bytearray) -> bytes:
    pos = 8
    while pos + 12 <= len(data):
        end = pos + 8 + int.from_bytes(data[pos : pos + 4], "big")
        if end + 4 > len(data):
            break
        data[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(data[pos + 4 : end])))
        pos = end + 4
    return bytes(data)


def _mutated(seed: bytes, rng: np.random.Generator) -> bytes:
    """One random corruption of a PNG with one IDAT: bytes flipped (CRCs then fixed
    or not), a truncation, or its inflated rows changed and recompressed (valid zlib, any filter bytes and
    lengths: what reaches libpng's row decoding)."""
    data = bytearray(seed)
    how = int(rng.integers(0, 4))
    if how == 0:
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(8, len(data)))] ^= int(rng.integers(1, 256))
        return bytes(data)
    if how == 1:
        data[int(rng.integers(16, len(data) - 12))] ^= int(rng.integers(1, 256))
    elif how == 2:
        data = data[: int(rng.integers(8, len(data)))]
    else:
        at = data.index(b"IDAT") - 4  # the IDAT chunk's offset
        length = int.from_bytes(data[at : at + 4], "big")
        raw = bytearray(zlib.decompress(bytes(data[at + 8 : at + 8 + length])))
        change = int(rng.integers(0, 3))
        if change == 0:
            raw[int(rng.integers(0, len(raw)))] = int(rng.integers(0, 256))
        elif change == 1:
            raw = raw[: int(rng.integers(0, len(raw)))]
        else:
            raw += bytes(int(rng.integers(1, 20)))
        body = zlib.compress(bytes(raw))
        data = data[:at] + struct.pack(">I", len(body)) + b"IDAT" + body + bytes(4) + data[at + 12 + length :]
    return _with_fixed_crcs(data) if rng.random() < 0.8 else bytes(data)


def test_decode_images_survives_corrupted_pngs(pillow_calls: list[bytes]) -> None:
    """A bounded, seeded fuzz: every corruption decodes as Pillow decodes it (or fails as Pillow fails), and
    none reaches a libpng failure inside the row decoding (which would kill the process, see
    _inflates_cleanly). Both paths are exercised."""
    seeds = [
        _png(_samples(7, 9, 2, 8, seed=1), 8, 2),
        _png(_samples(7, 9, 0, 8, seed=2), 8, 0, interlace=True),
        _png(_samples(5, 13, 3, 4, seed=3), 4, 3, palette=_palette(16, 1)),
        _png(_samples(6, 6, 6, 8, seed=4), 8, 6, interlace=True),
    ]
    rng = np.random.default_rng(0)
    corrupted = [_mutated(seeds[i % len(seeds)], rng) for i in range(400)]
    for channels in (1, 3):
        pillow_calls.clear()
        got = decode_images(corrupted, channels)
        for data, result in zip(corrupted, got, strict=True):
            assert _same(result, _pillow_outcome(data, channels)), data.hex()
        assert 100 < len(pillow_calls) < len(corrupted) - 20  # both the fast path and Pillow decided some


def test_decode_images_of_nothing_loads_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker warms the decoder up with an empty call (torchvision takes seconds to import)."""
    loads: list[bool] = []
    monkeypatch.setattr(preprocess, "_libpng", lambda: loads.append(True))
    assert decode_images([], 1) == []
    assert loads == [True]
