"""Embedding store: the on-disk contract between extraction and search.

A store is a folder `<cache>/embeddings/<model>-<dataset>-<split>-<key>/` holding
  vectors.npy      float32 (N, D), every row L2-normalised, so cosine similarity is the inner product
  labels.npy       int64 (N,), class index of each image
  paths.txt        N lines, the image each row came from
  bad_images.txt   the images that could not be used and why (skipped: they have no row)
  meta.json        the key (what the vectors depend on), shape, extraction timings, and each file's size and
                   checksum, verified whenever the store is opened
Row i is the i-th usable image of the ImageSet it was extracted from; its id in every index is i.

A store is written into a staging folder named after it, one part per process (rank) and attempt, and
renamed into place only when complete. A killed extraction leaves its parts there: the next attempt keeps
the rows that are whole and valid and extracts only the rest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from imgret.cache import damage, describe_files, move_aside
from imgret.rusage import CpuUse
from imgret.sources.base import ImageSet

log = logging.getLogger(__name__)

META = "meta.json"
DATA_FILES = ("vectors.npy", "labels.npy", "paths.txt", "bad_images.txt")
PART = re.compile(r"part-(?P<attempt>[^-]+)-(?P<rank>\d+)\.idx$")


def store_key(image_set: ImageSet, encoder_description: dict) -> dict:
    """Everything that changes the vectors: the images, the model and its weights, the preprocessing."""
    return {
        "dataset": image_set.dataset,
        "split": image_set.split,
        "images": image_set.fingerprint,
        "count": len(image_set),
        "encoder": encoder_description,
        "format": 2,  # 2: checksummed files, bad images skipped
    }


def store_dir(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "embeddings" / f"{key['encoder']['name']}-{key['dataset']}-{key['split']}-{digest}"


@dataclass(frozen=True)
class EmbeddingStore:
    path: Path

    @classmethod
    def open(cls, path: Path) -> "EmbeddingStore | None":
        """The store at `path` once its files match their recorded checksums; None if there is no store.
        A damaged store is moved aside (and so made again by the caller)."""
        path = Path(path)
        if not path.exists():
            return None
        try:
            recorded = json.loads((path / META).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        problem = damage(path, recorded) if recorded is not None else "meta.json is missing or unreadable"
        if problem:
            move_aside(path, problem)
            return None
        return cls(path)

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

    @cached_property
    def bad_images(self) -> list[str]:
        """One line per skipped image: `<index>\t<path>\t<why>`."""
        return [line for line in (self.path / "bad_images.txt").read_text().splitlines() if line]

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])


@dataclass(frozen=True)
class Progress:
    """What earlier, interrupted attempts left in the staging folder, after validation."""

    done: np.ndarray  # image indices with a valid row
    bad: dict[int, str]  # image index -> `<path>\t<why>` of images already found unusable
    dim: int | None


class StagedStore:
    """A store being written: each attempt's ranks append parts, then one process merges and commits them.

    Only one process extracts a given store at a time (the caller holds its lock), so the staging folder
    can be named after the store, and parts left by a killed attempt are found and resumed."""

    def __init__(self, final_dir: Path, attempt: str):
        self.final_dir = Path(final_dir)
        self.staging = self.final_dir.parent / f".{self.final_dir.name}.staging"
        self.attempt = attempt

    def part_paths(self, rank: int, attempt: str | None = None) -> tuple[Path, Path, Path]:
        stem = self.staging / f"part-{attempt or self.attempt}-{rank}"
        return stem.with_suffix(".f32"), stem.with_suffix(".idx"), stem.with_suffix(".bad")

    def open_part(self, rank: int):
        self.staging.mkdir(parents=True, exist_ok=True)
        return tuple(open(path, "ab") for path in self.part_paths(rank))

    def record_dim(self, dim: int) -> None:
        path = self.staging / "dim.json"
        if not path.is_file():
            self.staging.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".dim.{os.getpid()}.json")
            partial.write_text(json.dumps({"dim": dim}))
            os.replace(partial, path)

    def parts(self) -> list[tuple[str, int]]:
        if not self.staging.is_dir():
            return []
        return sorted((m["attempt"], int(m["rank"])) for p in self.staging.iterdir() if (m := PART.match(p.name)))

    def resume(self, count: int) -> Progress:
        """Validate what earlier attempts wrote, cut every part back to its whole and valid rows, and say
        which images are done. A row is valid when it is finite, unit-length and names an image of the set."""
        dim_path = self.staging / "dim.json"
        dim = json.loads(dim_path.read_text())["dim"] if dim_path.is_file() else None
        done, bad = [], {}
        for attempt, rank in self.parts():
            vectors_path, index_path, bad_path = self.part_paths(rank, attempt)
            if bad_path.is_file():
                text = bad_path.read_text(errors="replace")
                whole_lines = text[: text.rfind("\n") + 1]
                for line in whole_lines.splitlines():
                    index, _, rest = line.partition("\t")
                    if index.isdigit() and int(index) < count:
                        bad[int(index)] = rest
                with open(bad_path, "r+b") as handle:
                    handle.truncate(len(whole_lines.encode()))
            rows = 0
            if dim and vectors_path.is_file() and index_path.is_file():
                rows = min(index_path.stat().st_size // 8, vectors_path.stat().st_size // (4 * dim))
            if rows:
                indices = np.fromfile(index_path, dtype=np.int64, count=rows)
                vectors = np.fromfile(vectors_path, dtype=np.float32, count=rows * dim).reshape(rows, dim)
                norms = np.linalg.norm(vectors, axis=1)
                valid = np.isfinite(vectors).all(axis=1) & (np.abs(norms - 1) < 1e-3) & (indices >= 0) & (indices < count)
                rows = int(np.argmin(valid)) if not valid.all() else rows  # keep the valid prefix
                done.append(indices[:rows])
            for path, width in ((index_path, 8), (vectors_path, 4 * (dim or 0))):
                if path.is_file():
                    with open(path, "r+b") as handle:
                        handle.truncate(rows * width)
        done_indices = np.unique(np.concatenate(done)) if done else np.empty(0, dtype=np.int64)
        return Progress(done_indices, bad, dim)

    def merge_parts(self, image_set: ImageSet, dim: int, block_rows: int = 16384) -> int:
        """Assemble every part's rows into vectors.npy in image order, skipping the bad images, one block
        of rows at a time; write labels, paths and the bad-image list. Returns the number of rows.

        Memory stays flat however large the gallery: each block maps only the slice of each part it needs
        and unmaps it, and the output is written with plain file I/O (a written memmap would keep the whole
        file's pages in this process's resident set)."""
        progress = self.resume(len(image_set))
        kept = np.setdiff1d(np.arange(len(image_set)), np.fromiter(progress.bad, dtype=np.int64, count=len(progress.bad)))
        parts = [(self.part_paths(rank, attempt)[0], np.fromfile(self.part_paths(rank, attempt)[1], dtype=np.int64))
                 for attempt, rank in self.parts()]
        output = self.staging / "vectors.npy.part"
        with open(output, "wb") as out:
            np.lib.format.write_array_header_1_0(
                out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (len(kept), dim)})
            for start in range(0, len(kept), block_rows):
                wanted = kept[start:start + block_rows]
                block = np.empty((len(wanted), dim), dtype=np.float32)
                filled = np.zeros(len(wanted), dtype=bool)
                for vectors_path, indices in parts:
                    # a distributed sampler pads with repeats, and attempts may overlap: identical rows, any will do
                    rows = np.flatnonzero((indices >= wanted[0]) & (indices <= wanted[-1]))
                    if rows.size:
                        first, last = int(rows.min()), int(rows.max()) + 1
                        part = np.memmap(vectors_path, dtype=np.float32, mode="r", offset=first * dim * 4,
                                         shape=(last - first, dim))
                        positions = np.searchsorted(wanted, indices[rows])
                        hit = (positions < len(wanted)) & (wanted[np.minimum(positions, len(wanted) - 1)] == indices[rows])
                        block[positions[hit]] = part[rows[hit] - first]
                        filled[positions[hit]] = True
                        del part
                if not filled.all():
                    missing = wanted[~filled]
                    raise RuntimeError(f"extraction left {len(missing)} images without a vector (first: {missing[:5]})")
                out.write(block.tobytes())
        os.replace(output, self.staging / "vectors.npy")
        np.save(self.staging / "labels.npy", image_set.labels[kept])
        (self.staging / "paths.txt").write_text("\n".join(image_set.paths[i] for i in kept))
        (self.staging / "bad_images.txt").write_text("".join(f"{i}\t{progress.bad[i]}\n" for i in sorted(progress.bad)))
        for attempt, rank in self.parts():
            for path in self.part_paths(rank, attempt):
                path.unlink(missing_ok=True)
        return len(kept)

    def commit(self, meta: dict) -> EmbeddingStore:
        """Record each file's size and checksum in meta.json, written last, then rename: the store appears
        complete or not at all."""
        (self.staging / "dim.json").unlink(missing_ok=True)
        meta = {**meta, "files": describe_files(self.staging, DATA_FILES)}
        (self.staging / META).write_text(json.dumps(meta, indent=1))
        if self.final_dir.exists():  # a damaged or half-deleted store that open() did not take: never merge into it
            move_aside(self.final_dir, "replaced by a new extraction")
        os.rename(self.staging, self.final_dir)
        return EmbeddingStore(self.final_dir)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def remove_stale_staging(final_dir: Path) -> None:
    """Staging folders of the older, unresumable layout (`.<store>.tmp-<token>`) for this store."""
    for stale in Path(final_dir).parent.glob(f".{Path(final_dir).name}.tmp-*"):
        log.info("removing stale staging folder %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


@dataclass(frozen=True)
class Embeddings:
    gallery: EmbeddingStore
    queries: EmbeddingStore
    extracted: tuple[str, ...]  # the splits this call extracted; the others came from the cache
    checks: dict = field(default_factory=dict)  # what was checked about the source (logged as tags)

    @property
    def timings(self) -> dict[str, float]:
        """Throughput over both splits and batch-1 latency, as measured when the stores were made (for a
        resumed extraction: over the images its last attempt extracted)."""
        extractions = [self.gallery.meta["extraction"], self.queries.meta["extraction"]]
        images = sum(e["images"] for e in extractions)
        seconds = sum(e["seconds"] for e in extractions)
        used = CpuUse.of_records(extractions)
        return {  # NaN when nothing was extracted (generated vectors)
            "extract_ms_per_image": self.gallery.meta["extraction"]["ms_per_image_batch1"],
            "extract_images_per_s": images / seconds if seconds > 0 and images else float("nan"),
            # the kernel's share of the extraction's CPU time, and its pages faulted in, per image
            "extract_kernel_share": used.kernel_share if images else float("nan"),
            "extract_minor_faults_per_image": used.minor_faults / images if images else float("nan"),
        }

    @property
    def bad_images(self) -> list[str]:
        return [f"{store.meta['key']['split']}\t{line}" for store in (self.gallery, self.queries)
                for line in store.bad_images]
