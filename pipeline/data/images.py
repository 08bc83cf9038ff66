"""Image packing and content hashes.

Images are decoded once at prepare time, converted to RGB, resized to the training
resolution and re-encoded, so that mining and training read them from the shards and
never touch small files. Content keys identify identical targets across rows.

What cannot be packed raises an :class:`ImageDecodeError` whose ``reason`` is the reject
reason: ``image_too_large`` (more than ``MAX_IMAGE_PIXELS``, refused from the header before
any pixel is decoded), ``unsupported_image`` (a format or codec PIL cannot read) or
``corrupt_image`` (a known format whose bytes are broken). High-bit-depth images (16-bit,
32-bit integer, float) are scaled to 8 bits, not clipped; of a multi-frame image (GIF, TIFF)
the first frame is kept and the others are counted (``PackedImage.frames_dropped``).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from struct import error as struct_error
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are refused (PIL's own decompression-bomb warning size, 89.5 M pixels: about
# 270 MB as RGB); checked on the header, so a 20000 x 20000 PNG of 1 MB is never decoded.
MAX_IMAGE_PIXELS = 89_478_485
# File signatures of formats PIL reads: bytes that start so but do not open are corrupt.
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (``reason``: the reject reason)."""

    reason = "corrupt_image"


class UnsupportedImageError(ImageDecodeError):
    """An image format or codec PIL cannot read."""

    reason = "unsupported_image"


class ImageTooLargeError(ImageDecodeError):
    """More pixels than ``MAX_IMAGE_PIXELS``."""

    reason = "image_too_large"


@dataclass(frozen=True)
class PackOptions:
    """How images are packed into shards (from ``DataConfig``)."""

    image_size: int = 336
    image_resize: Literal["stretch", "pad"] = "stretch"
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = 95


@dataclass(frozen=True)
class PackedImage:
    data: bytes        # encoded PNG/JPEG, RGB, image_size x image_size
    pixel_sha256: str  # hash of the resized RGB pixels: equal pixels -> equal hash
    frames_dropped: int = 0  # frames after the first of a multi-frame image (not packed)


def open_image(raw: bytes) -> Image.Image:
    """The first frame of any PIL-readable image, decoded; refuses (see the module doc) an
    image too large, unsupported or corrupt."""
    with warnings.catch_warnings():  # the size is checked below, from the header
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(f"{err}") from err
        except UnidentifiedImageError as err:
            if not raw.startswith(_SIGNATURES):
                raise UnsupportedImageError(f"not an image format PIL reads ({len(raw)} "
                                            f"bytes, starting {raw[:8]!r})") from err
            if feature := _unsupported_tiff_feature(raw):
                raise UnsupportedImageError(f"a TIFF with {feature}, which PIL cannot "
                                            "decode") from err
            raise ImageDecodeError(f"cannot decode image ({len(raw)} bytes): broken header "
                                   f"of a known format ({raw[:8]!r})") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageDecodeError(f"cannot decode image ({len(raw)} bytes): {err}") from err
    pixels = image.width * image.height
    if pixels > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"{image.width}x{image.height} = {pixels} pixels > "
                                 f"{MAX_IMAGE_PIXELS} (not decoded)")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, NotImplementedError) as err:
        unsupported = (isinstance(err, NotImplementedError)
                       or any(w in str(err).lower() for w in ("not available", "unsupported")))
        raise (UnsupportedImageError if unsupported else ImageDecodeError)(
            f"cannot decode {image.format} image ({len(raw)} bytes): {err}") from err
    return image


def _unsupported_tiff_feature(raw: bytes) -> str | None:
    """What makes a TIFF whose first directory reads unsupported by PIL (its compression or
    pixel layout), or None (not a TIFF, or a broken one)."""
    from PIL import TiffImagePlugin

    if not raw.startswith((b"II*\x00", b"MM\x00*")):
        return None
    try:
        tags = TiffImagePlugin.ImageFileDirectory_v2(raw[:8])
        stream = io.BytesIO(raw)
        stream.seek(tags.next)
        tags.load(stream)
    except (OSError, SyntaxError, ValueError, KeyError, struct_error):
        return None
    compression = tags.get(259, 1)
    if compression not in TiffImagePlugin.COMPRESSION_INFO:
        return f"compression {compression}"
    try:
        TiffImagePlugin.TiffImageFile(io.BytesIO(raw))
    except SyntaxError as err:
        if str(err) == "unknown pixel mode":
            return (f"a pixel layout of {tags.get(258)} bits per sample, sample format "
                    f"{tags.get(339, (1,))}")
    except (OSError, ValueError, KeyError, struct_error):
        return None
    return None


def frame_count(image: Image.Image) -> int:
    return int(getattr(image, "n_frames", 1) or 1)


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float single-channel image scaled to 8-bit grey: 16-bit (and
    32-bit values within 0..65535) by 255/65535; float within [0, 1] by 255; anything else
    stretched from its minimum to its maximum."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif image.mode != "F" and low >= 0.0 and high <= 65535.0:
        scaled = values * (255.0 / 65535.0)
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, high bit depths scaled, transparency on white, RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_MODES:
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return image.convert("RGB")


def decode_rgb(raw: bytes) -> Image.Image:
    """Decode any PIL-readable image (its first frame) to RGB (see :func:`to_rgb`)."""
    return to_rgb(open_image(raw))


def resize(image: Image.Image, options: PackOptions) -> Image.Image:
    """Square ``image_size`` image: stretched, or aspect kept and padded with black."""
    side = options.image_size
    if options.image_resize == "stretch":
        return image.resize((side, side), Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (side, side), method=Image.Resampling.BICUBIC, color=(0, 0, 0))


def pack_image(raw: bytes, options: PackOptions) -> PackedImage:
    """Decode, convert to RGB, resize and re-encode one image (its first frame)."""
    opened = open_image(raw)
    frames_dropped = frame_count(opened) - 1
    image = resize(to_rgb(opened), options)
    out = io.BytesIO()
    if options.image_format == "png":
        image.save(out, format="PNG", optimize=False)
    else:
        image.save(out, format="JPEG", quality=options.jpeg_quality)
    pixel_sha = hashlib.sha256(image.tobytes()).hexdigest()
    return PackedImage(data=out.getvalue(), pixel_sha256=pixel_sha,
                       frames_dropped=frames_dropped)


def content_key(text: str, image: PackedImage | None) -> str:
    """Content hash of a (text, image) side: 32 hex digits."""
    h = hashlib.sha256()
    h.update(text.encode("utf-8"))
    h.update(b"\x00")
    h.update((image.pixel_sha256 if image is not None else "-").encode())
    return h.hexdigest()[:32]
