"""Image packing and content hashes.

Images are decoded once at prepare time, converted to RGB, resized to the training
resolution and re-encoded, so that mining and training read them from the shards and
never touch small files. Content keys identify identical targets across rows.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """The bytes are not a readable image."""


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


def decode_rgb(raw: bytes) -> Image.Image:
    """Decode any PIL-readable image, apply its EXIF orientation, convert to RGB."""
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"cannot decode image ({len(raw)} bytes): {err}") from err
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        return background
    return image.convert("RGB")


def resize(image: Image.Image, options: PackOptions) -> Image.Image:
    """Square ``image_size`` image: stretched, or aspect kept and padded with black."""
    side = options.image_size
    if options.image_resize == "stretch":
        return image.resize((side, side), Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (side, side), method=Image.Resampling.BICUBIC, color=(0, 0, 0))


def pack_image(raw: bytes, options: PackOptions) -> PackedImage:
    """Decode, convert to RGB, resize and re-encode one image."""
    image = resize(decode_rgb(raw), options)
    out = io.BytesIO()
    if options.image_format == "png":
        image.save(out, format="PNG", optimize=False)
    else:
        image.save(out, format="JPEG", quality=options.jpeg_quality)
    pixel_sha = hashlib.sha256(image.tobytes()).hexdigest()
    return PackedImage(data=out.getvalue(), pixel_sha256=pixel_sha)


def content_key(text: str, image: PackedImage | None) -> str:
    """Content hash of a (text, image) side: 32 hex digits."""
    h = hashlib.sha256()
    h.update(text.encode("utf-8"))
    h.update(b"\x00")
    h.update((image.pixel_sha256 if image is not None else "-").encode())
    return h.hexdigest()[:32]
