"""data=folder: any class-per-subfolder image tree; queries held out per class, or a second tree."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from imgret.errors import DataUnavailable, bad_value

from imgret.sources.base import ImageSettings, ImageSource, ImageSet, Splits, natural_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderSettings(ImageSettings):
    gallery_dir: str | None = None  # required: a class-per-subfolder tree
    query_dir: str | None = None  # a second tree; None: query_fraction of each class held out
    query_fraction: float = 0.1
    extensions: tuple[str, ...] = ()


def list_class_folder(folder: Path, extensions: Sequence[str]) -> dict[str, list[str]]:
    suffixes = {ext.lower() for ext in extensions}
    if not folder.is_dir():
        raise DataUnavailable(f"image folder {folder} does not exist")
    classes = {}
    for class_dir in sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)):
        files = [str(p) for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in suffixes]
        if files:
            classes[class_dir.name] = sorted(files, key=natural_key)
    if not classes:
        raise DataUnavailable(
            f"{folder} holds no images in class subfolders (<class>/<image>, extensions {', '.join(suffixes)})"
        )
    return classes


def listing_id(*listings: dict[str, list[str]]) -> str:
    digest = hashlib.sha256()
    for listing in listings:
        for files in listing.values():
            for path in files:
                stat = os.stat(path)
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"listing:{digest.hexdigest()[:16]}"


def folder_splits(data: FolderSettings, seed: int) -> Splits:
    gallery_listing = list_class_folder(Path(data.gallery_dir), data.extensions)
    if data.query_dir:
        query_listing = list_class_folder(Path(data.query_dir), data.extensions)
    else:
        fraction = float(data.query_fraction)
        rng = np.random.default_rng(seed)
        query_listing = {}
        for name, files in gallery_listing.items():
            n_query = min(len(files) - 1, max(1, round(fraction * len(files))))
            chosen = set(rng.permutation(len(files))[:n_query].tolist())
            query_listing[name] = [f for i, f in enumerate(files) if i in chosen]
            gallery_listing[name] = [f for i, f in enumerate(files) if i not in chosen]
    class_names = tuple(sorted(set(gallery_listing) | set(query_listing), key=natural_key))
    class_index = {name: i for i, name in enumerate(class_names)}
    source_id = listing_id(gallery_listing, query_listing)

    def make(split, listing):
        paths = [path for name in listing for path in listing[name]]
        labels = [class_index[name] for name in listing for _ in listing[name]]
        return ImageSet("folder", split, tuple(paths), np.asarray(labels, dtype=np.int64), class_names, source_id)

    return Splits(make("gallery", gallery_listing), make("queries", query_listing))


def check_folder(data: FolderSettings) -> None:
    if data.gallery_dir in (None, "???"):
        raise bad_value("data.gallery_dir", data.gallery_dir, "a folder of <class>/<image> files (required)")
    for key in ("gallery_dir", "query_dir"):
        value = getattr(data, key)
        if value is not None and not Path(str(value)).expanduser().is_dir():
            raise bad_value(f"data.{key}", value, "an existing folder of <class>/<image> files")
    if not data.query_dir:
        fraction = data.query_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
            raise bad_value("data.query_fraction", fraction, "a fraction strictly between 0 and 1")
    extensions = data.extensions
    if not extensions or not all(isinstance(e, str) and e.startswith(".") for e in extensions):
        raise bad_value("data.extensions", extensions, "a list of file endings such as [.jpg, .png]")


SOURCES = (ImageSource("folder", FolderSettings, check_folder, folder_splits),)
