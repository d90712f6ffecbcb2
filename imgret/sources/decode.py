"""Opening one image: fully decoded RGB, or `BadImage` saying why not. JPEGs by libjpeg-turbo when their header
is plain (the size read first, so a decompression bomb is refused before decoding), everything else by Pillow.
Paths are plain files, or `synthetic://...` addresses that fully describe a generated image."""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import BinaryIO, Callable, ContextManager

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgret.errors import BadImage


log = logging.getLogger(__name__)

SPLITS = ("gallery", "queries")
SYNTHETIC_SCHEME = "synthetic://"
# Pillow's own decompression-bomb threshold: larger images are refused unless data.max_image_pixels says otherwise.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# `open_image` checks data.max_image_pixels itself, from the header, before decoding: Pillow's own check would
# refuse images a user allowed, and name a limit the user never set.
Image.MAX_IMAGE_PIXELS = None


def open_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, model_side: int | None = None) -> Image.Image:
    """An RGB image, fully decoded, or `BadImage` saying why this file cannot be one (also: too large once resized
    to `model_side`, the model's shorter side, or of an extreme aspect ratio).

    Greyscale and palette images are converted (Tiny-ImageNet has greyscale ones); 16-bit and float
    images are scaled to 8 bits rather than clipped (Pillow's own convert would turn them white)."""
    if path.startswith(SYNTHETIC_SCHEME):
        return synthetic_image(path)
    return decode_image(path, path, max_pixels, model_side=model_side)


# JPEG frame headers torchvision.io.decode_jpeg reads as Pillow does: baseline, extended and progressive Huffman
_PLAIN_JPEG_FRAMES = (0xC0, 0xC1, 0xC2)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, read before any pixel is decoded; None when `data` is not a
    JPEG of 8-bit samples in a plain frame (lossless, arithmetic-coded and 12-bit ones are left to Pillow)."""
    if data[:2] != b"\xff\xd8":
        return None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if marker in _PLAIN_JPEG_FRAMES:
            if position + 10 > end:
                return None
            precision, components = data[position + 4], data[position + 9]
            height = int.from_bytes(data[position + 5:position + 7], "big")
            width = int.from_bytes(data[position + 7:position + 9], "big")
            return (width, height) if precision == 8 and components in (1, 3, 4) and width and height else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # another kind of frame, or a scan before any frame
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def read_small_file(path: str) -> bytearray | None:
    """A file's bytes in one read call (a third of what Python's buffered open costs on a 2 KB JPEG), or None
    when it cannot be read so (missing, unreadable, changing): the caller then lets Pillow open it and say why."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(descriptor).st_size
        data = os.read(descriptor, size + 1)
    except OSError:
        return None
    finally:
        os.close(descriptor)
    return bytearray(data) if len(data) == size else None


def decode_jpeg_rgb(data: bytearray):
    """JPEG bytes to a (3, H, W) uint8 RGB tensor by the op torchvision.io.decode_jpeg calls, without that
    function's per-call usage log and deprecation warning, which cost a third of the decode of a 64 px image."""
    import torch
    import torchvision.io  # registers torch.ops.image

    return torch.ops.image.decode_jpeg(torch.frombuffer(data, dtype=torch.uint8),
                                       torchvision.io.ImageReadMode.RGB.value, False)


def open_pixels(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, model_side: int | None = None):
    """`open_image` as a (3, H, W) uint8 tensor. JPEGs are decoded by torchvision's libjpeg-turbo op: the same
    pixels as Pillow's in half the time (no PIL image, no copy into a tensor), once their header's size passed the
    same checks. Any other format, and a JPEG it refuses (truncated, corrupt), goes through Pillow, which says why
    it is unusable."""
    from torchvision.transforms.functional import pil_to_tensor

    if path.startswith(SYNTHETIC_SCHEME):
        return pil_to_tensor(synthetic_image(path))
    data = read_small_file(path)
    size = jpeg_size(data) if data is not None else None
    if size is not None:
        refusal = size_refusal(path, *size, max_pixels, side=model_side)
        if refusal is not None:
            raise refusal
        try:
            return decode_jpeg_rgb(data)
        except RuntimeError:
            pass  # Pillow decides, and says why when it cannot decode it either
    return pil_to_tensor(open_image(path, max_pixels, model_side))  # from the path: Pillow's messages name the file


# An image more than this many times as long as it is wide (or the reverse) is refused: a resize that keeps the aspect
# ratio turns a thin one into a huge one (8,000 x 1 pixels at a 256-pixel side: 256 x 2,048,000), and the model's
# centre crop of it would show almost nothing.
MAX_ASPECT_RATIO = 100


def work_pixels(width: int, height: int, side: int | None) -> int:
    """The most pixels an image of this size takes on its way to a model whose resize makes its shorter side `side`
    (aspect kept): the decode's, or the resize's output, whichever is larger (the resize upsamples a thin image)."""
    if not side:
        return width * height
    return max(width * height, side * math.ceil(side * max(width, height) / max(min(width, height), 1)))


def size_refusal(name: str, width: int, height: int, max_pixels: int, limit_key: str = "data.max_image_pixels",
                 side: int | None = None) -> BadImage | None:
    """Why an image of this size is refused before any pixel is decoded, or None: over `max_pixels` decoded, over
    it once resized to the model's `side`, or of an extreme aspect ratio."""
    if width * height > max_pixels:
        return BadImage(name, f"{width}x{height} pixels is over {limit_key}={max_pixels}", "too_many_pixels")
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        return BadImage(name, f"{width}x{height} pixels: an aspect ratio over {MAX_ASPECT_RATIO}:1 (a resize that "
                              "keeps it would make a huge image of a thin one)", "bad_shape")
    needed = work_pixels(width, height, side)
    if needed > max_pixels:
        return BadImage(name, f"{width}x{height} pixels resize to {needed:,} pixels for the model's {side}-pixel side, "
                              f"over {limit_key}={max_pixels}", "too_many_pixels")
    return None


@contextlib.contextmanager
def pillow_errors(name: str):
    """Pillow's errors while opening or decoding `name` as the BadImage that says why it cannot be used."""
    try:
        yield
    except BadImage:
        raise
    except UnidentifiedImageError as error:  # not an image, or zero bytes
        raise BadImage(name, f"{type(error).__name__}: {error}", "not_an_image") from error
    except (OSError, ValueError, SyntaxError) as error:
        # Pillow: OSError (truncated), SyntaxError (broken header)
        raise BadImage(name, f"{type(error).__name__}: {error}") from error


def image_size(source: str | BinaryIO, name: str) -> tuple[int, int]:
    """(width, height) from the header alone, or BadImage when it is not an image Pillow reads."""
    with pillow_errors(name), Image.open(source) as image:
        return image.size


def decode_image(source: str | BinaryIO, name: str, max_pixels: int,
                 limit_key: str = "data.max_image_pixels", needed_side: int | None = None,
                 hold: Callable[[int], ContextManager] | None = None, model_side: int | None = None) -> Image.Image:
    """`open_image` for a path or an open file (an upload): the pixel count is checked from the header,
    before decoding, so a decompression bomb is refused without allocating its pixels, and so is an image that
    the model's resize would make too large (`size_refusal`).

    `needed_side`: the shorter side the consumer resizes to (the model's). A JPEG at least twice that is decoded
    at 1/2, 1/4 or 1/8 scale by libjpeg (Pillow's draft), and any image at least twice that is reduced (a box
    filter, by a whole factor) as soon as it is decoded, so that only the decode itself is ever full size.
    `model_side`: the model's side for the size check alone, where the pixels must be decoded whole (extraction's
    `pil` decoder, whose rows a reduced decode would change).
    `hold(pixels)`: a context (a budget of pixels at once) held while the decode's pixels exist, for the most
    pixels the image takes on its way to the model (`work_pixels`)."""
    side = needed_side or model_side
    with pillow_errors(name), Image.open(source) as image:
        refusal = size_refusal(name, image.width, image.height, max_pixels, limit_key, side)
        if refusal is not None:
            raise refusal
        if needed_side and image.format == "JPEG" and min(image.size) >= 2 * needed_side:
            image.draft("RGB", (needed_side, needed_side))  # the smallest scale still >= needed_side a side
        with hold(work_pixels(image.width, image.height, side)) if hold else contextlib.nullcontext():
            image.load()  # decode now: a truncated file fails here, not later inside a batch
            if needed_side and image.mode in REDUCIBLE_MODES:
                return to_rgb(reduced(image, needed_side))
            return reduced(to_rgb(image), needed_side) if needed_side else to_rgb(image)


REDUCIBLE_MODES = ("RGB", "RGBA", "L", "LA")  # Image.reduce's modes that to_rgb converts afterwards


def reduced(image: Image.Image, needed_side: int) -> Image.Image:
    """`image` made smaller by the largest whole factor that keeps its shorter side >= `needed_side`."""
    factor = min(image.size) // needed_side
    return image.reduce(factor) if factor >= 2 else image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        # 16-bit sources use the full 0..65535 range; float images are taken as 0..1 when they fit there
        top = 65535.0 if image.mode != "F" or pixels.max(initial=0) > 1.0 else 1.0
        pixels = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels over white, as a viewer shows them, rather than over whatever colour they hold
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def synthetic_image(path: str) -> Image.Image:
    """A smooth per-class colour pattern, shifted, brightened and noised per image."""
    seed, size, split, label, index = path[len(SYNTHETIC_SCHEME):].split("/")
    seed, size, label, index = int(seed), int(size), int(label), int(index)
    class_rng = np.random.default_rng([seed, label])
    coarse = class_rng.random((3, 4, 4), dtype=np.float32)
    pattern = np.kron(coarse, np.ones((1, size // 4 + 1, size // 4 + 1), np.float32))[:, :size, :size]
    image_rng = np.random.default_rng([seed, label, SPLITS.index(split), index])
    shift = image_rng.integers(-size // 8, size // 8 + 1, size=2)
    pattern = np.roll(pattern, tuple(shift), axis=(1, 2))
    pattern = pattern * image_rng.uniform(0.8, 1.2) + image_rng.normal(0, 0.08, pattern.shape)
    pixels = (np.clip(pattern, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(pixels, "RGB")
