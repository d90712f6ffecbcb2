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

    def merge_parts(self, image_set: ImageSet, dim: int, world_size: int, block_rows: int = 16384) -> None:
        """Assemble every rank's rows into vectors.npy, in image order, one block of rows at a time.

        Memory stays flat however large the gallery: each block maps only the slice of each part it
        needs and unmaps it, and the output is written with plain file I/O (a written memmap would keep
        the whole file's pages in this process's resident set)."""
        count = len(image_set)
        part_indices = [np.fromfile(self.part_paths(rank)[1], dtype=np.int64) for rank in range(world_size)]
        output = self.staging / "vectors.npy.part"
        with open(output, "wb") as out:
            np.lib.format.write_array_header_1_0(
                out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (count, dim)})
            for start in range(0, count, block_rows):
                block = np.empty((min(block_rows, count - start), dim), dtype=np.float32)
                filled = np.zeros(len(block), dtype=bool)
                for rank, indices in enumerate(part_indices):
                    # a distributed sampler pads with repeats: those rows are identical, any copy will do
                    rows = np.flatnonzero((indices >= start) & (indices < start + len(block)))
                    if rows.size:
                        first, last = int(rows.min()), int(rows.max()) + 1
                        part = np.memmap(self.part_paths(rank)[0], dtype=np.float32, mode="r",
                                         offset=first * dim * 4, shape=(last - first, dim))
                        block[indices[rows] - start] = part[rows - first]
                        filled[indices[rows] - start] = True
                        del part
                if not filled.all():
                    missing = start + np.flatnonzero(~filled)
                    raise RuntimeError(f"extraction left {len(missing)} images without a vector (first: {missing[:5]})")
                out.write(block.tobytes())
        for rank in range(world_size):
            for path in self.part_paths(rank):
                path.unlink()
        os.replace(output, self.staging / "vectors.npy")
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
