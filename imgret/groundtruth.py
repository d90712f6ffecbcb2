"""The exact top-k of every query: computed once per (gallery store, query store, k), cached, shared."""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgret.index import BruteForceIndex
from imgret.store import EmbeddingStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroundTruth:
    ids: np.ndarray  # (queries, k) int64, most similar first
    scores: np.ndarray  # (queries, k) float32 cosine similarities


def ground_truth_path(cache_dir: Path, gallery: EmbeddingStore, queries: EmbeddingStore, k: int) -> Path:
    return Path(cache_dir) / "groundtruth" / f"{gallery.path.name}__{queries.path.name}__k{k}.npz"


def exact_ground_truth(gallery: EmbeddingStore, queries: EmbeddingStore, k: int, cache_dir: Path) -> GroundTruth:
    path = ground_truth_path(cache_dir, gallery, queries, k)
    if path.is_file():
        with np.load(path) as cached:
            return GroundTruth(cached["ids"], cached["scores"])
    log.info("computing exact top-%d for %d queries over %d gallery vectors", k, len(queries), len(gallery))
    scores, ids = BruteForceIndex(gallery.vectors).search(queries.vectors, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npz")
    np.savez(partial, ids=ids, scores=scores)
    os.replace(partial, path)
    return GroundTruth(ids, scores)
