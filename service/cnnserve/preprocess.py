"""Turn images and tensors into model inputs, the same way for training and serving.

Training and the TorchServe handler call the same :func:`prepare_images`, so a digit sent to the server goes
through exactly the resize, padding and normalisation that the training images went through.

Decoding: :func:`decode_image` is Pillow, what training uses. :func:`decode_images` decodes a batch and reads
the PNGs it can show Pillow would read identically with torchvision's libpng decoder, bit for bit (2.4x
faster decoding 64 8x8 digits: bench/decode_profile.py); everything else goes through :func:`decode_image`.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from cnnserve.card import ModelCard
from cnnserve.contract import check_tensor
from cnnserve.errors import InvalidInputError

__all__ = [
    "Preprocessing",
    "prepare_images",
    "prepare_decoded",
    "decode_image",
    "decode_images",
    "decode_tensor",
    "encode_png",
    "MAX_IMAGE_PIXELS",
]

# Larger images are refused before they are decoded (a 4096x4096 photo is 16.7 M pixels).
MAX_IMAGE_PIXELS = 4096 * 4096

# ITU-R 601-2 luma, the weights Pillow's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocessing:
    channels: int
    resize: tuple[int, int]  # (H, W) before padding
    pad: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_card(cls, card: ModelCard) -> Preprocessing:
        return cls(
            channels=card.channels,
            resize=card.resize,
            pad=card.pad,
            mean=card.normalization.mean,
            std=card.normalization.std,
        )

    @property
    def output_shape(self) -> tuple[int, int, int]:
        height, width = self.resize
        return (self.channels, height + 2 * self.pad, width + 2 * self.pad)


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C0, H, W) float -> (N, channels, H, W): grey is repeated, colour is reduced to luma."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    raise InvalidInputError.for_field("image", f"cannot convert {have} channels to {channels}")


def prepare_images(images: torch.Tensor, pre: Preprocessing, *, normalize: bool = True) -> torch.Tensor:
    """uint8 images ``(N, C0, H0, W0)`` -> float32 model input ``(N, C, H, W)``.

    Steps: scale to [0, 1], convert channels, bilinear (antialiased) resize to ``pre.resize``, zero-pad by
    ``pre.pad``, then ``(x - mean) / std`` unless ``normalize`` is False (used to measure mean and std).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    batch = images.to(torch.float32).div_(255.0)
    batch = _convert_channels(batch, pre.channels)
    if tuple(batch.shape[-2:]) != pre.resize:
        batch = F.interpolate(batch, size=pre.resize, mode="bilinear", align_corners=False, antialias=True)
    if pre.pad:
        batch = F.pad(batch, (pre.pad, pre.pad, pre.pad, pre.pad))
    if normalize:
        mean = torch.tensor(pre.mean, dtype=batch.dtype).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, dtype=batch.dtype).view(1, -1, 1, 1)
        batch = (batch - mean) / std
    return batch.contiguous()


def prepare_decoded(decoded: Sequence[torch.Tensor], pre: Preprocessing) -> list[torch.Tensor]:
    """Decoded inputs -> model inputs ``(1, C, H, W)``, in order.

    uint8 ``(C, H, W)`` images are prepared together, one :func:`prepare_images` call per distinct size
    (measured: 64 digit images took 19 ms one by one and 0.3 ms as one batch); float tensors are already
    model inputs and pass through.
    """
    prepared: list[torch.Tensor | None] = [None] * len(decoded)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, item in enumerate(decoded):
        if item.dtype == torch.uint8:
            by_size.setdefault(tuple(item.shape), []).append(index)
        else:
            prepared[index] = item if item.dim() == 4 else item[None]
    for indices in by_size.values():
        batch = prepare_images(torch.stack([decoded[i] for i in indices]), pre)
        for index, row in zip(indices, torch.split(batch, 1)):  # (1, C, H, W) views, made in one call
            prepared[index] = row
    return [item for item in prepared if item is not None]


def encode_png(image: torch.Tensor) -> bytes:
    """A uint8 ``(C, H, W)`` image (C = 1 or 3) as PNG bytes: what a client sends, and
    :func:`decode_image` reads back unchanged."""
    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _too_large(width: int, height: int, max_pixels: int) -> InvalidInputError:
    return InvalidInputError.for_field(
        "image", f"{width}x{height} image is larger than the limit of {max_pixels:,} pixels"
    )


def decode_image(data: bytes | memoryview, channels: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, BMP, GIF, WebP, ...) -> uint8 ``(channels, H, W)``.

    Raises :class:`InvalidInputError` for empty, unrecognised, truncated or oversized images.
    """
    if not data:
        raise InvalidInputError.for_field("image", "empty body: expected encoded image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            width, height = opened.size
            if width * height > max_pixels:
                raise _too_large(width, height, max_pixels)
            opened.load()  # decodes fully: a truncated file fails here, not later
            # "L" for grey models, "RGB" for colour ones; alpha is dropped, palettes are expanded.
            image = opened.convert("L" if channels == 1 else "RGB")
    except InvalidInputError:
        raise
    except UnidentifiedImageError:
        raise InvalidInputError.for_field(
            "image", f"not an image Pillow can decode ({len(data)} bytes; PNG, JPEG, BMP, GIF, WebP, ...)"
        ) from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise InvalidInputError.for_field("image", f"corrupt or truncated image: {exc}") from None
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


class _PngHeader(NamedTuple):
    width: int
    height: int
    bit_depth: int
    colour_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA
    interlaced: bool  # Adam7
    idat: tuple[tuple[int, int], ...] = ()  # (start, end) of each IDAT chunk's data


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (colour type -> bit depths) libpng and Pillow both read to the same 8-bit samples: sub-byte grey is scaled
# to 0..255 by both, sub-byte palettes are looked up by both. 16-bit samples go to Pillow (it reduces them
# to 8 bits its own way, or keeps "I;16").
_FAST_DEPTHS = {0: (1, 2, 4, 8), 2: (8,), 3: (1, 2, 4, 8), 4: (8,), 6: (8,)}
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each colour type
# (x0, y0, dx, dy) of the seven Adam7 passes
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
# Larger decompressed image data goes to Pillow: the check below holds all of it in memory at once (and
# libpng's lead over Pillow shrinks with size: 1.5x on a 224x224 RGB image, ~5x on an 8x8 digit).
_MAX_FAST_RAW_BYTES = 1 << 24
# Ancillary chunks Pillow parses (PngStream.chunk_*) that cannot fail or change pixels once they are this
# long; any other chunk Pillow parses (zTXt, iTXt, the APNG ones, ...) sends the image to Pillow. Chunks
# Pillow does not parse are skipped by both decoders.
_SAFE_MIN_LENGTH = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"eXIf": 0, b"tEXt": 0, b"iCCP": 0}
_PILLOW_CHUNKS = frozenset(
    name[len("chunk_") :].encode("ascii")
    for name in dir(PngImagePlugin.PngStream)
    if name.startswith("chunk_")
)


def _iccp_is_safe(body: bytes | memoryview) -> bool:
    """Whether Pillow's iCCP handler reads this chunk without raising (it tolerates a bad zlib stream)."""
    body = bytes(body)
    name_end = body.find(b"\0")
    if name_end < 0 or name_end + 1 >= len(body) or body[name_end + 1] != 0:
        return False
    try:
        inflater = zlib.decompressobj()
        inflater.decompress(body[name_end + 2 :], PngImagePlugin.MAX_TEXT_CHUNK)
    except zlib.error:
        return True
    return not inflater.unconsumed_tail


def _trns_is_safe(header: _PngHeader, body: bytes | memoryview, palette: int) -> bool:
    """A tRNS chunk as the PNG spec has it (Pillow refuses short ones; neither decoder lets it change the
    colour samples: Pillow's convert drops transparency, libpng only strips the alpha it expands)."""
    if header.colour_type == 0:
        return len(body) == 2 and int.from_bytes(body, "big") < 1 << header.bit_depth
    if header.colour_type == 2:
        return len(body) == 6 and max(struct.unpack(">3H", body)) < 1 << header.bit_depth
    return header.colour_type == 3 and 1 <= len(body) <= palette


def _png_header(data: bytes | memoryview) -> _PngHeader | None:
    """The header of a PNG that libpng decodes to exactly Pillow's pixels, or None (not a PNG, or one whose
    handling could differ: leave it to Pillow, which also raises the errors).

    Walks every chunk up to IEND: each complete (length, type, data, CRC); the CRCs up to the end of the image
    data correct (Pillow checks those before it, libpng the IDATs); one IDAT run; no chunk either decoder
    could act on differently. :func:`_inflates_cleanly` then checks the image data itself.
    """
    if data[: len(_PNG_SIGNATURE)] != _PNG_SIGNATURE:
        return None
    unpack, crc32 = struct.unpack_from, zlib.crc32
    size, pos = len(data), len(_PNG_SIGNATURE)
    header: _PngHeader | None = None
    idat: list[tuple[int, int]] = []
    palette = text = 0  # PLTE entries; tEXt bytes (Pillow caps their total)
    after_idat = False
    while True:
        if pos + 12 > size:
            return None
        length, kind = unpack(">I4s", data, pos)
        end = pos + 8 + length  # the CRC's offset
        if end + 4 > size:
            return None
        if kind == b"IDAT":
            if after_idat or header is None or (header.colour_type == 3 and not palette):
                return None
            if crc32(data[pos + 4 : end]) != unpack(">I", data, end)[0]:
                return None
            idat.append((pos + 8, end))
            pos = end + 4
            continue
        after_idat = bool(idat)
        if not kind.isalpha() or (
            not after_idat and crc32(data[pos + 4 : end]) != unpack(">I", data, end)[0]
        ):
            return None
        if header is None:
            if kind != b"IHDR" or length != 13:
                return None
            width, height, depth, colour, compression, filtering, interlace = unpack(
                ">IIBBBBB", data, pos + 8
            )
            if not (0 < width < 1 << 31 and 0 < height < 1 << 31) or depth not in _FAST_DEPTHS.get(
                colour, ()
            ):
                return None
            if compression or filtering or interlace > 1:
                return None
            header = _PngHeader(width, height, depth, colour, bool(interlace))
        elif kind == b"IEND":
            return header._replace(idat=tuple(idat)) if idat else None
        elif kind == b"PLTE":
            if idat or palette or header.colour_type in (0, 4) or length % 3 or not 3 <= length <= 768:
                return None
            palette = length // 3
        elif kind == b"tRNS":
            if idat or not _trns_is_safe(header, data[pos + 8 : end], palette):
                return None
        elif not kind[0] & 0x20:  # critical (a second IHDR, an unknown one): libpng refuses, Pillow may not
            return None
        elif kind in _PILLOW_CHUNKS:
            if kind not in _SAFE_MIN_LENGTH or length < _SAFE_MIN_LENGTH[kind]:
                return None
            if kind == b"iCCP" and not _iccp_is_safe(data[pos + 8 : end]):
                return None
            text += length if kind == b"tEXt" else 0
            if text > PngImagePlugin.MAX_TEXT_MEMORY:
                return None
        pos = end + 4


def _inflates_cleanly(header: _PngHeader, data: bytes | memoryview) -> bool:
    """Whether the image data is one zlib stream that inflates, checksum included, to exactly the rows the
    header calls for, each with a known filter type.

    Needed, not only prudent: torchvision 0.29's decode_png crashes the process (SIGSEGV) when libpng fails
    on the rows (corrupt data, a bad filter byte, too little data), after its output tensor exists; errors in
    the chunks before the image data it raises cleanly.
    """
    width, height = header.width, header.height
    bits = _SAMPLES[header.colour_type] * header.bit_depth  # per pixel
    if header.interlaced:  # (rows, bytes per row with its filter byte) of each non-empty pass
        rows = [
            (-(-(height - y0) // dy), (-(-(width - x0) // dx) * bits + 7) // 8 + 1)
            for x0, y0, dx, dy in _ADAM7
            if width > x0 and height > y0
        ]
    else:
        rows = [(height, (width * bits + 7) // 8 + 1)]
    expected = sum(count * length for count, length in rows)
    if expected > _MAX_FAST_RAW_BYTES:
        return False
    inflater, parts, produced = zlib.decompressobj(), [], 0
    try:
        for start, end in header.idat:
            parts.append(inflater.decompress(data[start:end], expected + 1 - produced))  # at most 1 too many
            produced += len(parts[-1])
            if inflater.unconsumed_tail or produced > expected:
                return False
    except zlib.error:
        return False
    if not inflater.eof or inflater.unused_data or produced != expected:
        return False
    raw, offset = parts[0] if len(parts) == 1 else b"".join(parts), 0
    for count, length in rows:
        if raw[offset : offset + count * length : length].translate(None, b"\0\1\2\3\4"):
            return False  # filter types are 0 (None) to 4 (Paeth)
        offset += count * length
    return True


@functools.cache
def _libpng() -> Callable[[torch.Tensor, bool], torch.Tensor] | None:
    """torchvision's PNG decoder as ``decode(encoded, rgb)`` -> uint8 ``(3 if rgb else 1, H, W)``, or None
    where torchvision, its image extension or the operator as called here is missing (every image then goes
    through Pillow). Imported on first use: torchvision takes seconds to import."""
    try:
        from torchvision.io import ImageReadMode  # loads the image extension: it registers torch.ops.image

        operator = torch.ops.image.decode_png
    except (ImportError, AttributeError, RuntimeError):
        return None
    modes = (ImageReadMode.GRAY.value, ImageReadMode.RGB.value)

    def decode(encoded: torch.Tensor, rgb: bool) -> torch.Tensor:
        # RGB: palettes looked up, grey replicated, alpha dropped; GRAY: only alpha dropped (grey types only).
        # The operator itself: torchvision.io.decode_png adds ~2 us a call (usage logging, and a
        # DeprecationWarning every call: torchvision 0.29 deprecates its codecs for TorchCodec).
        return operator(encoded, modes[rgb], False)  # type: ignore[no-any-return]  # no apply_exif_orientation

    grey = torch.tensor([[[0, 127, 255]]], dtype=torch.uint8)  # (1, 1, 3)
    colour = torch.tensor([[[0, 255]], [[7, 9]], [[200, 1]]], dtype=torch.uint8)  # (3, 1, 2)
    try:
        works = all(
            torch.equal(decode(torch.frombuffer(bytearray(encode_png(probe)), dtype=torch.uint8), rgb), probe)
            for probe, rgb in ((grey, False), (colour, True))
        )
    except (RuntimeError, TypeError):  # built without libpng; another operator signature
        return None
    return decode if works else None


def _pillow_luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> ``(N, 1, H, W)``: Pillow's convert("L"), in its integers (ITU-R 601-2 luma in
    16-bit fixed point, rounded): ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``."""
    wide = rgb.to(torch.int32)
    weighted = wide[:, 0] * 19595 + wide[:, 1] * 38470 + wide[:, 2] * 7471 + 0x8000
    return (weighted >> 16).to(torch.uint8)[:, None]


def _decode_png(
    libpng: Callable[[torch.Tensor, bool], torch.Tensor],
    header: _PngHeader,
    data: bytes | memoryview,
    rgb: bool,
    max_pixels: int,
) -> torch.Tensor | InvalidInputError | None:
    """libpng's ``(3 if rgb else 1, H, W)`` image of a PNG :func:`_png_header` cleared, the error for an
    oversized one, or None: Pillow's to decode or refuse."""
    pixels = header.width * header.height
    bomb = Image.MAX_IMAGE_PIXELS  # read per call, as Pillow does
    if bomb is not None and pixels > bomb:
        return None  # Pillow refuses it from its header, in its own words
    if pixels > max_pixels:
        return _too_large(header.width, header.height, max_pixels)
    if not _inflates_cleanly(header, data):
        return None
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy: frombuffer warns on read-only
    try:
        image = libpng(encoded, rgb)
    except RuntimeError:  # whatever libpng still refuses
        return None
    return image if image.shape == (3 if rgb else 1, header.height, header.width) else None


def decode_images(
    datas: Sequence[bytes | memoryview], channels: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> list[torch.Tensor | InvalidInputError]:
    """Encoded images -> uint8 ``(channels, H, W)`` each, in order, the pixels :func:`decode_image` gives;
    the slot of a bad input holds the :class:`InvalidInputError` decode_image raises for it.

    PNGs that :func:`_png_header` clears are decoded by libpng (torchvision), an oversized one refused from
    its header, before any decoding; colour PNGs for a grey model are reduced to luma together, per size.
    Everything else (JPEG, BMP, 16-bit PNG, APNG, anything unusual or that libpng refuses) is decode_image's.
    The first call imports torchvision (seconds): a worker can make it at start-up, with no images.
    """
    results: list[torch.Tensor | InvalidInputError | None] = [None] * len(datas)
    to_luma: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}  # (H, W) -> (index, RGB image)
    # LOAD_TRUNCATED_IMAGES makes Pillow accept what the checks here assume it refuses; decode_image reads
    # channels other than 1 as RGB, which only matters for the models' 1 and 3.
    libpng = None if ImageFile.LOAD_TRUNCATED_IMAGES or channels not in (1, 3) else _libpng()
    for index, data in enumerate(datas):
        header = _png_header(data) if libpng is not None else None
        if libpng is None or header is None:
            continue
        luma = channels == 1 and header.colour_type in (2, 3, 6)  # colour: RGB for Pillow's luma
        result = _decode_png(libpng, header, data, channels == 3 or luma, max_pixels)
        if luma and isinstance(result, torch.Tensor):
            to_luma.setdefault((header.height, header.width), []).append((index, result))
        else:
            results[index] = result
    for members in to_luma.values():
        grey = _pillow_luma(torch.stack([image for _, image in members]))  # (N, 1, H, W)
        for (index, _), row in zip(members, grey):
            results[index] = row
    return [
        _pillow_or_error(data, channels, max_pixels) if result is None else result
        for data, result in zip(datas, results)
    ]


def _pillow_or_error(
    data: bytes | memoryview, channels: int, max_pixels: int
) -> torch.Tensor | InvalidInputError:
    try:
        return decode_image(data, channels, max_pixels)
    except InvalidInputError as exc:
        return exc


def decode_tensor(
    data: bytes | memoryview, shape: Sequence[int], expected_shape: Sequence[int], field: str = "tensor"
) -> torch.Tensor:
    """Little-endian float32 bytes with their shape -> a ``(C, H, W)`` tensor, checked.

    A tensor input is the model's input as it is: already resized and normalised, so it must have exactly the
    model's input shape (a leading batch dimension of 1 is accepted) and finite values.
    """
    dims = check_tensor(data, shape, field)  # the contract's own checks: valid shape, length, finite
    if len(dims) == len(expected_shape) + 1 and dims[0] == 1:
        dims = dims[1:]
    if dims != tuple(expected_shape):
        raise InvalidInputError.for_field(
            f"{field}.shape",
            f"shape {list(dims)} does not match the model's input shape {list(expected_shape)}",
        )
    array = np.frombuffer(data, dtype="<f4").reshape(dims)
    return torch.from_numpy(array.astype(np.float32, copy=True))
