"""Galleries that are vectors already: no images, no model. Each split is planned here (its key, count and
chunks); imgret.embed.vector_stores writes the chunks straight into an embedding store (memory holds one chunk),
L2-normalised, under the same key rules as extracted stores:
  data=synthetic_vectors  clustered unit vectors of any size, seeded
  data=vectors            embeddings researchers bring (imgret.sources.vector_files reads them)

A vector source's stores have the same layout and checks as extracted ones, so every later stage (ground
truth, indexes, search, tracking) treats them alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from imgret.errors import bad_value, whole
from imgret.sources.base import SourceSettings, VectorSource
from imgret.sources.decode import SPLITS
from imgret.sources.vector_files import VectorFile, clip_retrieval_names, open_vectors

log = logging.getLogger(__name__)

CHUNK_ROWS = 65536
NOISE_BLOCK_ROWS = 4096


@dataclass
class SplitPlan:
    """What one split's store holds and how to produce it: `chunks()` yields (rows, labels, names) in order."""
    key: dict
    count: int
    dim: int
    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray, list[str]]]]
    notes: dict = field(default_factory=dict)  # recorded in the store's meta.json


def normalised(rows: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero: similar to nothing); `in_place` scales `rows` itself,
    a block at a time, so no temporary of their size is made."""
    rows = np.asarray(rows, dtype=np.float32)
    if not in_place:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)
    for block in range(0, len(rows), NOISE_BLOCK_ROWS):
        part = rows[block:block + NOISE_BLOCK_ROWS]
        norms = np.linalg.norm(part, axis=1, keepdims=True)
        part /= np.where(norms > 0, norms, 1.0)
    return rows


# --------------------------------------------------------------------------- data=synthetic_vectors


@dataclass(frozen=True)
class SyntheticVectorsSettings(SourceSettings):
    gallery_size: int = 100_000
    query_size: int = 1000
    dim: int = 512
    clusters: int = 100  # a vector's label is its cluster
    spread: float = 1.0  # offset from the centre, within a subspace shared by all clusters
    intrinsic_dim: int = 32  # that subspace's dimension
    noise: float = 0.3  # noise in every dimension


def _centres_and_subspace(seed: int, clusters: int, dim: int, intrinsic_dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    subspace = np.linalg.qr(rng.normal(size=(dim, intrinsic_dim)))[0].T.astype(np.float32)  # orthonormal rows
    return centres, subspace


def synthetic_chunk(data: SyntheticVectorsSettings, seed: int, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of a split: each chunk from its own seeded generator, so any chunk can be made alone.

    A row is its cluster's centre, plus an offset in a shared low-dimensional subspace (`intrinsic_dim`) of
    length about `spread`, plus a little noise in every dimension. Offsets in few dimensions give a cluster's
    points real near neighbours, as embeddings of similar images have, so approximate indexes miss some at
    few probes; isotropic noise alone would make every same-cluster point about equally near."""
    dim, clusters, intrinsic_dim = int(data.dim), int(data.clusters), int(data.intrinsic_dim)
    centres, subspace = _centres_and_subspace(seed, clusters, dim, intrinsic_dim)
    rng = np.random.default_rng([seed, SPLITS.index(split), start // CHUNK_ROWS])
    count = stop - start
    labels = rng.integers(0, clusters, count)
    offsets = rng.normal(size=(count, intrinsic_dim)).astype(np.float32) * (float(data.spread) / np.sqrt(intrinsic_dim))
    rows = offsets @ subspace  # one product for the chunk: its rounding is part of the stores' identity
    noise = float(data.noise) / np.sqrt(dim)
    # Block by block, the noise drawn in order (the same stream as one draw): memory holds the chunk and one
    # block's temporaries, not a float64 copy of the chunk.
    for block in range(0, count, NOISE_BLOCK_ROWS):
        part = slice(block, min(count, block + NOISE_BLOCK_ROWS))
        rows[part] += centres[labels[part]]
        rows[part] += noise * rng.normal(size=(part.stop - part.start, dim)).astype(np.float32)
    return normalised(rows, in_place=True), labels.astype(np.int64)


def synthetic_plans(data: SyntheticVectorsSettings, seed: int) -> dict[str, SplitPlan]:
    params = {key: getattr(data, key) for key in ("dim", "clusters", "spread", "intrinsic_dim", "noise")}
    plans = {}
    for split, count in zip(SPLITS, (int(data.gallery_size), int(data.query_size))):
        def chunks(split=split, count=count):
            for start in range(0, count, CHUNK_ROWS):
                stop = min(count, start + CHUNK_ROWS)
                rows, labels = synthetic_chunk(data, seed, split, start, stop)
                yield rows, labels, [f"{data.name}/{split}/{i}" for i in range(start, stop)]

        key = {"dataset": data.name, "split": split, "count": count,
               "generator": {**params, "seed": seed, "version": 2}, "encoder": {"name": "vectors"}, "format": 2}
        plans[split] = SplitPlan(key, count, int(data.dim), chunks)
    return plans


# --------------------------------------------------------------------------- data=vectors


@dataclass(frozen=True)
class VectorFilesSettings(SourceSettings):
    gallery: str | None = None  # required: a file of vectors, or a clip-retrieval output folder
    queries: str | None = None  # a file of query vectors; None: the HDF5's test set, else held out
    query_size: int = 1000  # without a query file: gallery vectors held out as queries
    gallery_labels: str | None = None  # a .npy of whole-number labels, one per gallery vector
    query_labels: str | None = None


def _identity(path: Path) -> dict:
    """Which file (or folder of files) a store was made from: path, sizes and modification times."""
    files = sorted((path / "img_emb").glob("img_emb_*.npy")) if path.is_dir() else [path]
    return {"path": str(path.resolve()), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _labels_file(path) -> np.ndarray:
    return np.load(Path(path).expanduser()).astype(np.int64)  # shape and type checked by data.check_vectors


def _rows_plan(name: str, source: VectorFile, rows: np.ndarray | None, labels: np.ndarray | None,
               names: list[str] | None, key: dict) -> SplitPlan:
    """A split made of `rows` of `source` (all of them when None), read in chunks of consecutive source rows."""
    selected = np.arange(source.count) if rows is None else rows
    labels = np.full(source.count, -1, dtype=np.int64) if labels is None else labels

    def chunks():
        for start in range(0, len(selected), CHUNK_ROWS):
            picked = selected[start:start + CHUNK_ROWS]
            first, last = int(picked[0]), int(picked[-1])
            if last - first < 2 * len(picked):  # nearly consecutive rows: one sequential read
                block = np.asarray(source.rows[first:last + 1])[picked - first]
            else:  # scattered rows (held-out queries): read only those
                block = np.concatenate([np.asarray(source.rows[i:i + 1]) for i in picked])
            yield (normalised(block), labels[picked],
                   [names[i] if names else f"{name}:{i}" for i in picked])

    return SplitPlan(key, len(selected), source.dim, chunks)


def file_plans(data: VectorFilesSettings, seed: int) -> dict[str, SplitPlan]:
    """The gallery and query splits of `data.gallery`: queries from `data.queries`, else the HDF5 file's `test`
    set, else `data.query_size` rows held out of the gallery (seeded)."""
    gallery_path = Path(str(data.gallery)).expanduser()
    gallery = open_vectors(gallery_path)
    if gallery.kind.startswith(("TEXMEX", "big-ann")):
        log.info("%s: %s sets (SIFT, GIST, DEEP, ...) are usually searched by L2 distance on the raw vectors; "
                 "imgret L2-normalises them and searches by cosine similarity, so its neighbours and ground truth "
                 "are those of the normalised vectors", gallery_path.name, gallery.kind)
    source_name = gallery_path.name
    base = {"dataset": data.name, "source": _identity(gallery_path), "encoder": {"name": "vectors"},
            "format": 2, "version": 1}
    gallery_labels = _labels_file(data.gallery_labels) if data.gallery_labels else None
    names = clip_retrieval_names(gallery)
    if data.queries:
        query_path = Path(str(data.queries)).expanduser()
        queries = open_vectors(query_path)
        query_labels = _labels_file(data.query_labels) if data.query_labels else None
        query_key = {"queries": _identity(query_path)}
        return {"gallery": _rows_plan(source_name, gallery, None, gallery_labels, names,
                                      {**base, "split": "gallery", "count": gallery.count}),
                "queries": _rows_plan(query_path.name, queries, None, query_labels, None,
                                      {**base, **query_key, "split": "queries", "count": queries.count})}
    if "queries" in gallery.extras:  # ann-benchmarks: train is the gallery, test the queries
        test = VectorFile(gallery.extras["queries"], gallery_path, gallery.kind)
        plans = {"gallery": _rows_plan(f"{source_name}/train", gallery, None, gallery_labels, None,
                                       {**base, "split": "gallery", "count": gallery.count}),
                 "queries": _rows_plan(f"{source_name}/test", test, None, None, None,
                                       {**base, "split": "queries", "count": test.count})}
        plans["gallery"].notes["distance"] = gallery.extras["distance"]
        return plans
    query_size = int(data.query_size)
    held_out = np.zeros(gallery.count, dtype=bool)
    held_out[np.random.default_rng([seed, 11]).choice(gallery.count, query_size, replace=False)] = True
    split_key = {"held_out": {"query_size": query_size, "seed": seed}}
    return {"gallery": _rows_plan(source_name, gallery, np.flatnonzero(~held_out), gallery_labels, names,
                                  {**base, **split_key, "split": "gallery", "count": gallery.count - query_size}),
            "queries": _rows_plan(source_name, gallery, np.flatnonzero(held_out), gallery_labels, names,
                                  {**base, **split_key, "split": "queries", "count": query_size})}


def check_synthetic_vectors(data: SyntheticVectorsSettings) -> None:
    for key, low in (("gallery_size", 1), ("query_size", 1), ("dim", 2), ("clusters", 1)):
        if not whole(getattr(data, key), low):
            raise bad_value(f"data.{key}", getattr(data, key), f"a whole number >= {low}")
    for key, meaning in (("spread", "how far points lie from their centre, along the cluster's subspace"),
                         ("noise", "noise in every dimension")):
        value = getattr(data, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise bad_value(f"data.{key}", value, f"a number >= 0: {meaning}")
    intrinsic = data.intrinsic_dim
    if not whole(intrinsic, 1) or intrinsic > data.dim:
        raise bad_value("data.intrinsic_dim", intrinsic, f"a whole number from 1 to data.dim ({data.dim})")


def check_vectors(data: VectorFilesSettings) -> None:
    """The files exist and are what their endings say (headers only), and the split fits in them."""
    from imgret.sources.vector_files import FILE_FORMATS, VectorFileError, open_vectors

    files = {"gallery": data.gallery, "queries": data.queries}
    if files["gallery"] in (None, "???"):
        raise bad_value("data.gallery", files["gallery"], f"a file of vectors ({', '.join(FILE_FORMATS)}) or a "
                        "clip-retrieval output folder (required)")
    shapes = {}
    for split, value in files.items():
        if value is None:
            continue
        path = Path(str(value)).expanduser()
        if not path.exists():
            raise bad_value(f"data.{split}", value, "an existing file of vectors or clip-retrieval folder")
        try:
            shapes[split] = open_vectors(path)
        except (VectorFileError, OSError) as error:
            raise bad_value(f"data.{split}", value, f"a readable file of vectors ({error})") from error
    gallery = shapes["gallery"]
    if "queries" in shapes and shapes["queries"].dim != gallery.dim:
        raise bad_value("data.queries", files["queries"], f"vectors of the gallery's dimension {gallery.dim} "
                        f"(it holds dimension {shapes['queries'].dim})")
    for key, split in (("gallery_labels", "gallery"), ("query_labels", "queries")):
        value = getattr(data, key)
        if value is None:
            continue
        expected = shapes[split].count if split in shapes else None
        try:
            labels = np.load(Path(str(value)).expanduser(), mmap_mode="r")  # the header only
            fits = labels.ndim == 1 and labels.dtype.kind in "iu" and expected in (None, len(labels))
        except (OSError, ValueError):
            fits = False
        if not fits:
            raise bad_value(f"data.{key}", value, "a .npy of whole-number labels, one per vector"
                            + (f" ({expected})" if expected is not None else "") + ", or null")
    if "queries" not in shapes and "queries" not in gallery.extras:
        if not whole(data.query_size, 1) or data.query_size >= gallery.count:
            raise bad_value("data.query_size", data.query_size, "a whole number of vectors to hold out "
                            f"of the gallery as queries, from 1 to {gallery.count - 1}")


def synthetic_shape(data: SyntheticVectorsSettings) -> tuple[int, int]:
    """(gallery size, dimension): the settings say."""
    return int(data.gallery_size), int(data.dim)


def file_shape(data: VectorFilesSettings) -> tuple[int, int]:
    """(gallery size, dimension), from the files' headers: nothing is read."""
    gallery = open_vectors(Path(str(data.gallery)).expanduser())  # headers: no labels, names or sampling
    held_out = 0 if data.queries or "queries" in gallery.extras else int(data.query_size)
    return gallery.count - held_out, gallery.dim


SOURCES = (VectorSource("synthetic_vectors", SyntheticVectorsSettings, check_synthetic_vectors, synthetic_plans,
                        synthetic_shape),
           # an ann-benchmarks file carries its own neighbours: imgret's ground truth is checked against them
           VectorSource("vectors", VectorFilesSettings, check_vectors, file_plans, file_shape, has_reference=True,
                        labelled=False))
