"""What every data source hands on: `ImageSet` (parallel paths and integer labels, and a fingerprint that
changes whenever the set of images changes: it keys the embedding cache), `Splits`, the registry's entry
`DataSource`, and the keys every image source has."""
from __future__ import annotations

import hashlib
import logging
import re
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from imgret.errors import allowed, bad_value, whole
from imgret.options import Options
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
class SourceSettings:
    """A data source's settings (conf/data/<name>.yaml), typed: each source declares its keys as a subclass."""
    name: str = ""

    @classmethod
    def of(cls, section) -> "SourceSettings":
        """A data config section (a DictConfig, a mapping, or these settings): the keys this source has, resolved;
        others (a yaml's hint for another group, such as synthetic's nlist) are left out."""
        if isinstance(section, cls):
            return section
        values = Options.of(section)
        return cls(**{item.name: _plain(values[item.name]) for item in dataclasses.fields(cls) if item.name in values})


def _plain(value):
    """A list from a config as a tuple: settings are frozen."""
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class ImageSettings(SourceSettings):
    """The keys every image source has: the stratified limits and what to do with a bad image."""
    gallery_limit: int | None = None  # N images per class (stratified, deterministic); None: all
    query_limit: int | None = None
    on_bad_image: str = "skip"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ImageSource:
    """A source of images to embed, one module and one conf/data/<name>.yaml: `settings`, its keys' type; `check`
    validates them before any work, `load` lists its splits."""
    name: str
    settings: type[ImageSettings]
    check: Callable[..., None]  # (settings) -> None, raises ConfigError
    load: Callable[..., Splits]  # (settings, seed) -> Splits


@dataclass(frozen=True)
class VectorSource:
    """A source of ready vectors, no images and no model: `settings`, its keys' type; `plan` says what each split's
    store holds (imgret.embed.vector_stores writes it), `shape` the gallery's size and dimension before any work
    (from settings or file headers); `has_reference`: its files may carry their own neighbours to check imgret's
    exact ground truth against."""
    name: str
    settings: type[SourceSettings]
    check: Callable[..., None]  # (settings) -> None, raises ConfigError
    plan: Callable[..., dict]  # (settings, seed) -> {split: SplitPlan}
    shape: Callable[..., tuple[int, int]]  # (settings) -> (gallery size, dimension)
    has_reference: bool = False
    labelled: bool = True  # its vectors carry classes (filter=label needs them)

    def provide(self, data: SourceSettings, seed: int) -> "ReadyVectors":
        size, dim = self.shape(data)
        return ReadyVectors(self, data, seed, size, dim)


@dataclass(frozen=True)
class ImagesToEmbed:
    """What an image source provides: its splits' images, for a model to embed."""
    splits: Splits

    @property
    def gallery_size(self) -> int:
        return len(self.splits.gallery)


@dataclass(frozen=True)
class ReadyVectors:
    """What a vector source provides: stores it plans from its settings (`data`), of a known size and dimension."""
    source: VectorSource
    data: SourceSettings  # the source's settings
    seed: int
    gallery_size: int
    dim: int


DataSource = ImageSource | VectorSource


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


def check_common(data: ImageSettings) -> None:
    """Keys every image source has: the stratified limits and what to do with a bad image."""
    for key in ("gallery_limit", "query_limit"):
        value = getattr(data, key)
        if value is not None and not whole(value, 1):
            raise bad_value(f"data.{key}", value, "a whole number of images per class >= 1, or null for all")
    if data.on_bad_image not in BAD_IMAGE_POLICIES:
        raise bad_value("data.on_bad_image", data.on_bad_image, f"one of {allowed(BAD_IMAGE_POLICIES)}")
    if not whole(data.max_image_pixels, 1):
        raise bad_value("data.max_image_pixels", data.max_image_pixels, "a whole number of pixels >= 1")
