"""Embedding store: the on-disk contract between extraction and search.

A store is a folder `<cache>/embeddings/<model>-<dataset>-<split>-<key>/` holding
  vectors.npy  float32 (N, D), every row L2-normalised, so cosine similarity is the inner product
  labels.npy   int64 (N,), class index of each image
  paths.txt    N lines, the image each row came from
  meta.json    the key (what the vectors depend on), shape, and how long extraction took
Row i is image i of the ImageSet it was extracted from; its id in every index is i.

A store is written into a staging folder, one part file per process (rank), and renamed into place
only when complete, so a crash never leaves a folder that looks like a store.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from imgret.data import ImageSet

META = "meta.json"


def store_key(image_set: ImageSet, encoder_description: dict) -> dict:
    """Everything that changes the vectors: the images, the model and its weights, the preprocessing."""
    return {
        "dataset": image_set.dataset,
        "split": image_set.split,
        "images": image_set.fingerprint,
        "count": len(image_set),
        "encoder": encoder_description,
        "format": 1,
    }


def store_dir(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "embeddings" / f"{key['encoder']['name']}-{key['dataset']}-{key['split']}-{digest}"


@dataclass(frozen=True)
class EmbeddingStore:
    path: Path

    @classmethod
    def open(cls, path: Path) -> "EmbeddingStore | None":
        """The store at `path`, or None if there is no complete store there."""
        return cls(Path(path)) if (Path(path) / META).is_file() else None

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.path / META).read_text())

    @cached_property
    def vectors(self) -> np.ndarray:
        return np.load(self.path / "vectors.npy", mmap_mode="r")

    @cached_property
    def labels(self) -> np.ndarray:
        return np.load(self.path / "labels.npy")

    @cached_property
    def paths(self) -> list[str]:
        return (self.path / "paths.txt").read_text().split("\n")[: len(self.labels)]

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])


class StagedStore:
    """A store being written: ranks append parts, then one process merges and commits it."""

    def __init__(self, final_dir: Path, token: str):
        self.final_dir = Path(final_dir)
        self.staging = self.final_dir.parent / f".{self.final_dir.name}.tmp-{token}"

    def part_paths(self, rank: int) -> tuple[Path, Path]:
        return self.staging / f"part-{rank}.f32", self.staging / f"part-{rank}.idx"

    def open_part(self, rank: int):
        self.staging.mkdir(parents=True, exist_ok=True)
        vectors_path, index_path = self.part_paths(rank)
        return open(vectors_path, "wb"), open(index_path, "wb")

    def merge_parts(self, image_set: ImageSet, dim: int, world_size: int) -> None:
        """Assemble the rows of every rank into vectors.npy, in image order, streaming through memmaps."""
        count = len(image_set)
        vectors = np.lib.format.open_memmap(self.staging / "vectors.npy.part", mode="w+", dtype=np.float32,
                                            shape=(count, dim))
        seen = np.zeros(count, dtype=bool)
        for rank in range(world_size):
            vectors_path, index_path = self.part_paths(rank)
            indices = np.fromfile(index_path, dtype=np.int64)
            part = np.memmap(vectors_path, dtype=np.float32, mode="r", shape=(len(indices), dim))
            for start in range(0, len(indices), 65536):  # bounded memory however large the gallery
                chunk = indices[start:start + 65536]
                vectors[chunk] = part[start:start + 65536]
            seen[indices] = True  # a distributed sampler pads with repeats: those rows are identical
            del part
            vectors_path.unlink()
            index_path.unlink()
        if not seen.all():
            missing = np.flatnonzero(~seen)
            raise RuntimeError(f"extraction left {len(missing)} images without a vector (first: {missing[:5]})")
        vectors.flush()
        del vectors
        os.replace(self.staging / "vectors.npy.part", self.staging / "vectors.npy")
        np.save(self.staging / "labels.npy", image_set.labels)
        (self.staging / "paths.txt").write_text("\n".join(image_set.paths))

    def commit(self, meta: dict) -> EmbeddingStore:
        """Write meta.json last, then rename: the store appears complete or not at all."""
        (self.staging / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(self.staging, self.final_dir)
        except OSError:
            if EmbeddingStore.open(self.final_dir) is None:
                raise
            shutil.rmtree(self.staging, ignore_errors=True)  # a concurrent run committed the same store first
        return EmbeddingStore(self.final_dir)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
