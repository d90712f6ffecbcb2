"""Galleries that are vectors already: no images, no model. Each split's rows are written in chunks straight
into an embedding store (memory holds one chunk), L2-normalised, under the same key rules as extracted stores:
  data=synthetic_vectors  clustered unit vectors of any size, seeded
  data=vectors            embeddings researchers bring (imgret.sources.vector_files reads them)

A vector source's stores have the same layout and checks as extracted ones, so every later stage (ground
truth, indexes, search, tracking) treats them alike.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from imgret.cache import file_lock
from imgret.embed.extract import Embeddings
from imgret.embed.store import EmbeddingStore, StagedStore, store_dir
from imgret.sources.vector_files import VectorFile, clip_retrieval_names, open_vectors

log = logging.getLogger(__name__)

CHUNK_ROWS = 65536
SPLITS = ("gallery", "queries")
REFERENCE_CHECK_QUERIES = 200  # queries whose exact top-10 is compared with an ann-benchmarks file's neighbors


@dataclass
class SplitPlan:
    """What one split's store holds and how to produce it: `chunks()` yields (rows, labels, names) in order."""
    key: dict
    count: int
    dim: int
    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray, list[str]]]]
    notes: dict = field(default_factory=dict)  # recorded in the store's meta.json


def normalised(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)  # an all-zero row stays zero: similar to nothing


# --------------------------------------------------------------------------- data=synthetic_vectors


def _centres_and_subspace(seed: int, clusters: int, dim: int, intrinsic_dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    subspace = np.linalg.qr(rng.normal(size=(dim, intrinsic_dim)))[0].T.astype(np.float32)  # orthonormal rows
    return centres, subspace


def synthetic_chunk(data_cfg, seed: int, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of a split: each chunk from its own seeded generator, so any chunk can be made alone.

    A row is its cluster's centre, plus an offset in a shared low-dimensional subspace (`intrinsic_dim`) of
    length about `spread`, plus a little noise in every dimension. Offsets in few dimensions give a cluster's
    points real near neighbours, as embeddings of similar images have, so approximate indexes miss some at
    few probes; isotropic noise alone would make every same-cluster point about equally near."""
    dim, clusters, intrinsic_dim = int(data_cfg.dim), int(data_cfg.clusters), int(data_cfg.intrinsic_dim)
    centres, subspace = _centres_and_subspace(seed, clusters, dim, intrinsic_dim)
    rng = np.random.default_rng([seed, SPLITS.index(split), start // CHUNK_ROWS])
    count = stop - start
    labels = rng.integers(0, clusters, count)
    offsets = rng.normal(size=(count, intrinsic_dim)).astype(np.float32) * (float(data_cfg.spread) / np.sqrt(intrinsic_dim))
    rows = centres[labels] + offsets @ subspace
    rows += (float(data_cfg.noise) / np.sqrt(dim)) * rng.normal(size=(count, dim)).astype(np.float32)
    return normalised(rows), labels.astype(np.int64)


def synthetic_plans(data_cfg, seed: int) -> dict[str, SplitPlan]:
    params = {key: data_cfg[key] for key in ("dim", "clusters", "spread", "intrinsic_dim", "noise")}
    plans = {}
    for split, count in zip(SPLITS, (int(data_cfg.gallery_size), int(data_cfg.query_size))):
        def chunks(split=split, count=count):
            for start in range(0, count, CHUNK_ROWS):
                stop = min(count, start + CHUNK_ROWS)
                rows, labels = synthetic_chunk(data_cfg, seed, split, start, stop)
                yield rows, labels, [f"{data_cfg.name}/{split}/{i}" for i in range(start, stop)]

        key = {"dataset": data_cfg.name, "split": split, "count": count,
               "generator": {**params, "seed": seed, "version": 2}, "encoder": {"name": "vectors"}, "format": 2}
        plans[split] = SplitPlan(key, count, int(data_cfg.dim), chunks)
    return plans


# --------------------------------------------------------------------------- data=vectors


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


def file_plans(data_cfg, seed: int) -> dict[str, SplitPlan]:
    """The gallery and query splits of `data.gallery`: queries from `data.queries`, else the HDF5 file's `test`
    set, else `data.query_size` rows held out of the gallery (seeded)."""
    gallery_path = Path(str(data_cfg.gallery)).expanduser()
    gallery = open_vectors(gallery_path)
    if gallery.kind.startswith(("TEXMEX", "big-ann")):
        log.info("%s: %s sets (SIFT, GIST, DEEP, ...) are usually searched by L2 distance on the raw vectors; "
                 "imgret L2-normalises them and searches by cosine similarity, so its neighbours and ground truth "
                 "are those of the normalised vectors", gallery_path.name, gallery.kind)
    source_name = gallery_path.name
    base = {"dataset": data_cfg.name, "source": _identity(gallery_path), "encoder": {"name": "vectors"},
            "format": 2, "version": 1}
    gallery_labels = (_labels_file(data_cfg.gallery_labels)
                      if data_cfg.get("gallery_labels") else None)
    names = clip_retrieval_names(gallery)
    if data_cfg.get("queries"):
        query_path = Path(str(data_cfg.queries)).expanduser()
        queries = open_vectors(query_path)
        query_labels = (_labels_file(data_cfg.query_labels)
                        if data_cfg.get("query_labels") else None)
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
    query_size = int(data_cfg.query_size)
    held_out = np.zeros(gallery.count, dtype=bool)
    held_out[np.random.default_rng([seed, 11]).choice(gallery.count, query_size, replace=False)] = True
    split_key = {"held_out": {"query_size": query_size, "seed": seed}}
    return {"gallery": _rows_plan(source_name, gallery, np.flatnonzero(~held_out), gallery_labels, names,
                                  {**base, **split_key, "split": "gallery", "count": gallery.count - query_size}),
            "queries": _rows_plan(source_name, gallery, np.flatnonzero(held_out), gallery_labels, names,
                                  {**base, **split_key, "split": "queries", "count": query_size})}


def reference_check(data_cfg, gallery: EmbeddingStore, queries: EmbeddingStore) -> dict | None:
    """For an ann-benchmarks file whose metric is imgret's own (angular = cosine): how many of the file's
    top-10 neighbors imgret's exact top-10 has, over the first REFERENCE_CHECK_QUERIES queries. For another
    metric the file's neighbors answer a different question, which is said and not checked."""
    if data_cfg.get("queries"):
        return None
    source = open_vectors(Path(str(data_cfg.gallery)).expanduser())
    if "neighbors" not in source.extras:
        return None
    distance = source.extras["distance"]
    if distance != "angular":
        log.warning("%s ranks neighbors by %s distance on its raw vectors; imgret searches by cosine similarity "
                    "of L2-normalised vectors, so its exact ground truth differs from the file's and the file's "
                    "neighbors are not checked", source.path.name, distance)
        return {"distance": distance, "checked": False}
    from imgret.index.groundtruth import exact_top_k
    from imgret.measure.metrics import recall_at

    count = min(REFERENCE_CHECK_QUERIES, len(queries))
    depth = min(10, len(gallery), source.extras["neighbors"].shape[1])
    _, ids = exact_top_k(gallery.vectors, np.asarray(queries.vectors[:count]), depth, progress=False)
    agreement = recall_at(ids, np.asarray(source.extras["neighbors"][:count, :depth]), depth)
    log.info("%s: imgret's exact top-%d holds %.4f of the file's own neighbors (first %d queries)",
             source.path.name, depth, agreement, count)
    return {"distance": distance, "checked": True, "queries": count, "depth": depth, "agreement": agreement}


# --------------------------------------------------------------------------- writing stores


PLANNERS = {"synthetic_vectors": synthetic_plans, "vectors": file_plans}


def _write_store(plan: SplitPlan, final_dir: Path, split: str) -> EmbeddingStore:
    staged = StagedStore(final_dir, "generate")
    staged.discard()
    staged.staging.mkdir(parents=True)
    labels = np.empty(plan.count, dtype=np.int64)
    start_time, written = time.perf_counter(), 0
    with open(staged.staging / "vectors.npy", "wb") as out, open(staged.staging / "paths.txt", "w") as paths:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (plan.count, plan.dim)})
        chunks = -(-plan.count // CHUNK_ROWS)
        for rows, chunk_labels, names in tqdm(plan.chunks(), total=chunks, desc=f"{split} · {plan.count:,} vectors",
                                              unit="chunk", disable=chunks <= 1, mininterval=2):
            out.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
            labels[written:written + len(rows)] = chunk_labels
            paths.write("".join(f"{name}\n" for name in names))
            written += len(rows)
    assert written == plan.count, f"{split}: wrote {written} rows of {plan.count}"
    np.save(staged.staging / "labels.npy", labels)
    (staged.staging / "bad_images.txt").write_text("")
    seconds = time.perf_counter() - start_time
    meta = {"key": plan.key, "count": plan.count, "dim": plan.dim, "image_count": plan.count, "bad_images": 0,
            "extraction": {"seconds": seconds, "images": 0, "resumed_rows": 0, "ms_per_image_batch1": float("nan"),
                           "written_rows_per_s": plan.count / seconds if seconds > 0 else None},
            **plan.notes, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return staged.commit(meta)


def ensure_vector_stores(cfg) -> Embeddings:
    """The gallery and query stores of a vector source, written once (under their locks) and reused."""
    cache_dir = Path(cfg.paths.cache)
    plans = PLANNERS[cfg.data.name](cfg.data, int(cfg.seed))
    stores, made = {}, []
    for split in SPLITS:
        plan = plans[split]
        final_dir = store_dir(cache_dir, plan.key)
        with file_lock(final_dir, f"the {split} vector store {final_dir.name}"):
            store = EmbeddingStore.open(final_dir)
            if store is None:
                log.info("writing %d %s vectors into %s", plan.count, split, final_dir)
                store = _write_store(plan, final_dir, split)
                made.append(split)
        stores[split] = store
    checks = {}
    if cfg.data.name == "vectors":
        checks = {f"reference_{key}": str(value) for key, value in
                  (reference_check(cfg.data, stores["gallery"], stores["queries"]) or {}).items()}
    return Embeddings(stores["gallery"], stores["queries"], tuple(made), checks)


def vector_shape(data_cfg) -> tuple[int, int]:
    """(gallery size, dimension) of a vector source, from its settings or its files' headers: nothing is read."""
    if data_cfg.name == "synthetic_vectors":
        return int(data_cfg.gallery_size), int(data_cfg.dim)
    gallery = open_vectors(Path(str(data_cfg.gallery)).expanduser())  # headers: no labels, names or sampling
    held_out = 0 if data_cfg.get("queries") or "queries" in gallery.extras else int(data_cfg.query_size)
    return gallery.count - held_out, gallery.dim
