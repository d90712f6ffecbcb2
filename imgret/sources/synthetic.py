"""data=synthetic: generated images with class structure, addressed by `synthetic://` paths that describe them
whole, for a smoke run with nothing downloaded."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from imgret.errors import bad_value, whole

from imgret.sources.base import ImageSettings, ImageSource, ImageSet, Splits
from imgret.sources.decode import SYNTHETIC_SCHEME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticSettings(ImageSettings):
    num_classes: int = 10
    gallery_per_class: int = 20
    query_per_class: int = 4
    image_size: int = 64


def synthetic_splits(data: SyntheticSettings, seed: int) -> Splits:
    size = int(data.image_size)
    n_classes = int(data.num_classes)
    class_names = tuple(f"class_{c:03d}" for c in range(n_classes))

    def make(split, per_class):
        paths = [f"{SYNTHETIC_SCHEME}{seed}/{size}/{split}/{c}/{i}" for c in range(n_classes) for i in range(per_class)]
        labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
        return ImageSet("synthetic", split, tuple(paths), labels, class_names, f"synthetic:{seed}:{size}")

    return Splits(make("gallery", int(data.gallery_per_class)), make("queries", int(data.query_per_class)))


def check_synthetic(data: SyntheticSettings) -> None:
    for key, low in (("image_size", 8), ("num_classes", 1), ("gallery_per_class", 1), ("query_per_class", 1)):
        if not whole(getattr(data, key), low):
            raise bad_value(f"data.{key}", getattr(data, key), f"a whole number >= {low}")


SOURCES = (ImageSource("synthetic", SyntheticSettings, check_synthetic, synthetic_splits),)
