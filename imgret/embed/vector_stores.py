"""A vector source's stores (imgret.sources.vectors plans them): each split's chunks written straight into an
embedding store, under its lock, once; the same layout and checks as extracted stores, so every later stage
treats them alike."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from imgret.cache import file_lock
from imgret.embed.store import Embeddings, EmbeddingStore, StagedStore, store_dir
from imgret.mapped import written_back
from imgret.sources.registry import source_of
from imgret.sources.vectors import CHUNK_ROWS, SPLITS, SplitPlan

log = logging.getLogger(__name__)


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
            out.write(memoryview(np.ascontiguousarray(rows, dtype=np.float32)).cast("B"))
            out.flush()
            written_back(out.fileno())  # a store larger than memory must not stay in the cache as dirty pages
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


def ensure_vector_stores(data, seed: int, cache_dir: Path) -> Embeddings:
    """The gallery and query stores of a vector source (`data`: its settings), written once (under their locks)
    and reused."""
    source = source_of(data)
    plans = source.plan(source.settings.of(data), int(seed))
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
    return Embeddings(stores["gallery"], stores["queries"], tuple(made))
