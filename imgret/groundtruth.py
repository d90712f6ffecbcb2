"""The exact top-k of every query: computed once per (gallery store, query store, k), cached, shared.

The cache file's size and checksum are recorded beside it (`.json`) and verified on every load; a damaged
file is moved aside and computed again."""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgret.cache import damage, describe_files, file_lock, move_aside
from imgret.index import BruteForceIndex
from imgret.store import EmbeddingStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroundTruth:
    ids: np.ndarray  # (queries, k) int64, most similar first
    scores: np.ndarray  # (queries, k) float32 cosine similarities


def ground_truth_path(cache_dir: Path, gallery: EmbeddingStore, queries: EmbeddingStore, k: int) -> Path:
    return Path(cache_dir) / "groundtruth" / f"{gallery.path.name}__{queries.path.name}__k{k}.npz"


def _load_verified(path: Path, shape: tuple[int, int]) -> GroundTruth | None:
    meta_path = path.with_suffix(".json")
    if not path.exists() and not meta_path.exists():
        return None
    try:
        problem = damage(path.parent, {path.name: json.loads(meta_path.read_text())["file"]})
    except (OSError, ValueError, KeyError, TypeError):
        problem = "its checksum file is missing or unreadable"
    if problem is None:
        try:
            with np.load(path) as cached:
                truth = GroundTruth(cached["ids"], cached["scores"])
            if truth.ids.shape == shape and truth.scores.shape == shape:
                return truth
            problem = f"it holds {truth.ids.shape}, not {shape}"
        except (OSError, ValueError, KeyError) as error:
            problem = f"numpy cannot read it: {error}"
    for damaged in (path, meta_path):
        if damaged.exists():
            move_aside(damaged, problem)
    return None


def exact_ground_truth(gallery: EmbeddingStore, queries: EmbeddingStore, k: int, cache_dir: Path) -> GroundTruth:
    path = ground_truth_path(cache_dir, gallery, queries, k)
    with file_lock(path, f"the ground truth {path.name}"):
        truth = _load_verified(path, (len(queries), k))
        if truth is not None:
            return truth
        log.info("computing exact top-%d for %d queries over %d gallery vectors", k, len(queries), len(gallery))
        scores, ids = BruteForceIndex(gallery.vectors).search(queries.vectors, k)
        token = uuid.uuid4().hex[:8]
        partial = path.with_name(f".{path.stem}.{token}.npz")
        np.savez(partial, ids=ids, scores=scores)
        partial_meta = path.with_name(f".{path.stem}.{token}.json")
        partial_meta.write_text(json.dumps({"file": describe_files(path.parent, [partial.name])[partial.name]}))
        os.replace(partial, path)
        os.replace(partial_meta, path.with_suffix(".json"))
        return GroundTruth(ids, scores)
