"""Galleries that are vectors already: no images, no model. `data=synthetic_vectors` generates clustered unit
vectors of any size, seeded, written in chunks straight into embedding stores (memory holds one chunk).

A vector source's stores have the same layout and checks as extracted ones, so every later stage (ground
truth, indexes, search, tracking) treats them alike.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from imgret.cache import file_lock
from imgret.extract import Embeddings
from imgret.store import EmbeddingStore, StagedStore, store_dir

log = logging.getLogger(__name__)

CHUNK_ROWS = 65536


def sizes(data_cfg) -> tuple[int, int]:
    return int(data_cfg.gallery_size), int(data_cfg.query_size)


def _centres(seed: int, clusters: int, dim: int) -> np.ndarray:
    centres = np.random.default_rng([seed, 7]).normal(size=(clusters, dim)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def synthetic_chunk(data_cfg, seed: int, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of a split: each chunk from its own seeded generator, so any chunk can be made alone."""
    dim, clusters = int(data_cfg.dim), int(data_cfg.clusters)
    centres = _centres(seed, clusters, dim)
    rng = np.random.default_rng([seed, ("gallery", "queries").index(split), start // CHUNK_ROWS])
    labels = rng.integers(0, clusters, stop - start)
    rows = centres[labels] + (float(data_cfg.spread) / np.sqrt(dim)) * rng.normal(size=(stop - start, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(np.float32), labels.astype(np.int64)


def _key(data_cfg, seed: int, split: str, count: int) -> dict:
    params = {key: data_cfg[key] for key in ("dim", "clusters", "spread")}
    return {"dataset": data_cfg.name, "split": split, "count": count, "generator": {**params, "seed": seed, "version": 1},
            "encoder": {"name": "vectors"}, "format": 2}


def _write_store(data_cfg, seed: int, split: str, count: int, final_dir: Path, key: dict) -> EmbeddingStore:
    staged = StagedStore(final_dir, "generate")
    staged.discard()
    staged.staging.mkdir(parents=True)
    dim = int(data_cfg.dim)
    labels = np.empty(count, dtype=np.int64)
    start_time = time.perf_counter()
    with open(staged.staging / "vectors.npy", "wb") as out, open(staged.staging / "paths.txt", "w") as paths:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (count, dim)})
        for start in tqdm(range(0, count, CHUNK_ROWS), desc=f"{split} · {count:,} synthetic vectors", unit="chunk",
                          disable=count <= CHUNK_ROWS, mininterval=2):
            stop = min(count, start + CHUNK_ROWS)
            rows, labels[start:stop] = synthetic_chunk(data_cfg, seed, split, start, stop)
            out.write(rows.tobytes())
            paths.write("".join(f"{data_cfg.name}/{split}/{i}\n" for i in range(start, stop)))
    np.save(staged.staging / "labels.npy", labels)
    (staged.staging / "bad_images.txt").write_text("")
    seconds = time.perf_counter() - start_time
    meta = {"key": key, "count": count, "dim": dim, "image_count": count, "bad_images": 0,
            "extraction": {"seconds": seconds, "images": 0, "resumed_rows": 0, "ms_per_image_batch1": float("nan"),
                           "generated_rows_per_s": count / seconds if seconds > 0 else None},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return staged.commit(meta)


def ensure_vector_stores(cfg) -> Embeddings:
    """The gallery and query stores of a vector source, generated once (under their locks) and reused."""
    cache_dir = Path(cfg.paths.cache)
    stores, made = {}, []
    for split, count in zip(("gallery", "queries"), sizes(cfg.data)):
        key = _key(cfg.data, int(cfg.seed), split, count)
        final_dir = store_dir(cache_dir, key)
        with file_lock(final_dir, f"the {split} vector store {final_dir.name}"):
            store = EmbeddingStore.open(final_dir)
            if store is None:
                log.info("generating %d %s vectors into %s", count, split, final_dir)
                store = _write_store(cfg.data, int(cfg.seed), split, count, final_dir, key)
                made.append(split)
        stores[split] = store
    return Embeddings(stores["gallery"], stores["queries"], tuple(made))

