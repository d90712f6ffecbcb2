"""What every data source hands on: `ImageSet` (parallel paths and integer labels, and a fingerprint that
changes whenever the set of images changes: it keys the embedding cache), `Splits`, the registry's entry
`DataSource`, and the keys every image source has."""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from imgret.errors import allowed, bad_value, whole
from imgret.sources.decode import DEFAULT_MAX_IMAGE_PIXELS, open_image

log = logging.getLogger(__name__)


BAD_IMAGE_POLICIES = ("skip", "fail")


@dataclass(frozen=True)
class ImageSet:
    """One split: image i is `paths[i]`, of class `class_names[labels[i]]`."""

    dataset: str
    split: str
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    source_id: str  # what the paths point into: an archive digest, a folder's listing hash, ...

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.dataset}|{self.split}|{self.source_id}|".encode())
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(f"{path}\t{label}\n".encode())
        return digest.hexdigest()[:16]

    def open(self, i: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
        return open_image(self.paths[i], max_pixels)


@dataclass(frozen=True)
class Splits:
    gallery: ImageSet
    queries: ImageSet
    titles: dict[str, str] = field(default_factory=dict)  # class name -> what a person calls it ("n01443537": "goldfish")


@dataclass(frozen=True)
class DataSource:
    """One kind of data, one module and one conf/data/<name>.yaml: `check` validates its keys before any work;
    an image source's `load` lists its splits; a vector source (no images, no model) has `plan` instead, which
    says what each split's store holds (imgret.embed.vector_stores writes it)."""

    check: Callable[..., None]  # (data_cfg) -> None, raises ConfigError
    load: Callable[..., Splits] | None = None  # (data_cfg, seed) -> Splits
    plan: Callable[..., dict] | None = None  # (data_cfg, seed) -> {split: SplitPlan}


def stratified_subset(image_set: ImageSet, per_class: int | None) -> ImageSet:
    """The first `per_class` images of every class, in the set's (deterministic) order."""
    if per_class is None:
        return image_set
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(image_set.labels.tolist()):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return ImageSet(
        dataset=image_set.dataset,
        split=image_set.split,
        paths=tuple(image_set.paths[i] for i in keep),
        labels=image_set.labels[keep],
        class_names=image_set.class_names,
        source_id=image_set.source_id,
    )


def natural_key(text: str) -> list:
    """`img_2` before `img_10`, so that 'the first N images' means what a person expects."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def check_common(data_cfg) -> None:
    """Keys every image source has: the stratified limits and what to do with a bad image."""
    for key in ("gallery_limit", "query_limit"):
        value = data_cfg.get(key)
        if value is not None and not whole(value, 1):
            raise bad_value(f"data.{key}", value, "a whole number of images per class >= 1, or null for all")
    policy = data_cfg.get("on_bad_image", "skip")
    if policy not in BAD_IMAGE_POLICIES:
        raise bad_value("data.on_bad_image", policy, f"one of {allowed(BAD_IMAGE_POLICIES)}")
    max_pixels = data_cfg.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    if not whole(max_pixels, 1):
        raise bad_value("data.max_image_pixels", max_pixels, "a whole number of pixels >= 1")
