"""A model's preprocessing, split where extraction runs it: per image in the loader (a file to a uint8
tensor), per batch in the loader (resize and crop), and in the module (to float, /255, (x - mean) / std).

Both timm's and open_clip's eval transforms are [resize, crop, (RGB)] + ToTensor + Normalize, which is what
makes the split exact. Two decoders (`extract.decoder`); their pixels differ, so the store's key names it:

- `torchvision`: JPEGs decoded by torchvision's libjpeg-turbo op (the same pixels as Pillow's), other formats by
  Pillow; the model's resize and crop by torchvision.transforms.v2 on uint8 batches, whose resize follows
  Pillow's to within 2 of 255 levels (tests/test_preprocess.py). `python -m imgret.bench --parts extract`
  measures the speed-up over `pil` end to end and what it changes in the embeddings.
- `pil`: the model's own transform on each PIL image, the reference.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from imgret.errors import ConfigError, bad_value
from imgret.sources.decode import open_image, open_pixels, to_rgb
from imgret.embed.options import DECODERS, DEFAULT_DECODER

# the steps of an eval transform the torchvision decoder runs on tensors (the others ask for extract.decoder=pil)
TENSOR_STEPS = ("Resize", "CenterCrop")
RGB_STEPS = ("MaybeConvertMode", "_convert_to_rgb")  # decoding already gives RGB


def check_tensor_preprocessing(preprocessing: dict) -> None:
    """Before any work: the model's resize and crop (its description's) are ones the torchvision decoder runs."""
    for key, value in (("crop_mode", preprocessing.get("crop_mode")), ("resize_mode", preprocessing.get("resize_mode"))):
        if value not in (None, "center", "shortest", "squash"):
            raise bad_value("extract.decoder", "torchvision", f"a decoder for this model's {key}={value} (resize then "
                            "centre crop only): use extract.decoder=pil")


def _name(step) -> str:
    return getattr(step, "__name__", type(step).__name__)


def tensor_step(step):
    """The torchvision.transforms.v2 step doing on a uint8 batch what `step` does to one PIL image."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    if isinstance(step, T.Resize):
        return v2.Resize(step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=True)
    if isinstance(step, T.CenterCrop):
        return v2.CenterCrop(step.size)
    raise ConfigError(f"extract.decoder=torchvision runs {'/'.join(TENSOR_STEPS)} on tensors, and this model's "
                      f"preprocessing has {step!r}; use extract.decoder=pil")


class Preprocessing:
    """What the loader does to images before the module: `load` one file, `from_image` one PIL image (an upload),
    then `batch` them into one uint8 (B, 3, S, S) tensor; `mean` and `std` are the module's half."""

    def __init__(self, transform, decoder: str = DEFAULT_DECODER):
        from torchvision import transforms as T
        from torchvision.transforms import v2

        if decoder not in DECODERS:
            raise bad_value("extract.decoder", decoder, f"one of {', '.join(DECODERS)}")
        steps = list(getattr(transform, "transforms", []))
        if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or "ToTensor" not in type(steps[-2]).__name__:
            raise ValueError(f"cannot split {transform}: it does not end in ToTensor, Normalize")
        self.decoder = decoder
        self.mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)
        geometric = steps[:-2]
        # the shorter side the model's resize makes (or its crop, without a resize): a decode needs no more
        sides = [step.size for step in geometric if isinstance(step, (T.Resize, T.CenterCrop))]
        first = sides[0] if sides else None
        self.needed_side = (max(first) if isinstance(first, (tuple, list)) else first) if first is not None else None
        if decoder == "pil":
            self.per_image = T.Compose(geometric + [T.PILToTensor()])
            self.per_batch = self.early_resize = None
        else:
            self.per_image = None
            steps = [tensor_step(step) for step in geometric if _name(step) not in RGB_STEPS]
            self.per_batch = v2.Compose(steps)
            # run on one large image as soon as it is decoded: the same pixels as in its batch (resize works image by
            # image, and resizing to the size an image has is the identity), and only small images wait in batches
            self.early_resize = steps[0] if steps and isinstance(steps[0], v2.Resize) else None

    def load(self, path: str, max_pixels: int) -> torch.Tensor:
        """One image file as a uint8 (3, H, W) tensor: at the model's size for `pil`, as decoded otherwise."""
        if self.per_image is not None:
            return self.per_image(open_image(path, max_pixels, self.needed_side))
        pixels = open_pixels(path, max_pixels, self.needed_side)
        if self.early_resize is not None and self.needed_side and min(pixels.shape[-2:]) >= 2 * self.needed_side:
            return self.early_resize(pixels)  # a loader holds one full-size decode at a time, never a batch of them
        return pixels

    def from_image(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        image = to_rgb(image)
        return self.per_image(image) if self.per_image is not None else pil_to_tensor(image)

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loaded images as one batch at the model's size: resized together where they share a size."""
        if not images:
            return torch.empty(0, dtype=torch.uint8)
        if self.per_batch is None:
            return stack_pixels(images)
        by_size: dict[tuple, list[int]] = {}
        for position, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(position)
        if len(by_size) == 1:
            return self.per_batch(stack_pixels(images))
        resized: list[torch.Tensor | None] = [None] * len(images)
        for positions in by_size.values():
            for position, image in zip(positions, self.per_batch(stack_pixels([images[p] for p in positions]))):
                resized[position] = image
        return stack_pixels(resized)


def stack_pixels(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) images as one (B, 3, H, W) batch in channels-last memory. Decoders hand out height-width-channel
    pixels seen as (3, H, W): stacking them as they lie is a plain copy, where a (B, 3, H, W) stack would
    transpose every image (and the resize and the network want channels last anyway): half the time."""
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
