"""The exact top-k of every query: computed once per (gallery store, query store, k), cached, shared.

Computed independently of every search method, in bounded memory however large the gallery: the gallery is
streamed in blocks from its memory map, float32 products pick each query's best k + margin candidates, and
the candidates are re-ranked in float64, so the order is exact. The cache file's size and checksum are
recorded beside it (`.json`) and verified on every load; a damaged file is moved aside and computed again."""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import torch
from tqdm.auto import tqdm

from imgret.cache import damage, describe_files, file_lock, gather_rows, move_aside, release_pages
from imgret.embed.store import EmbeddingStore

# The cache file's name carries this: files computed another way (v1: by the brute-force method) are not reused.
VERSION = 2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroundTruth:
    ids: np.ndarray  # (queries, k) int64, most similar first
    scores: np.ndarray  # (queries, k) float32 cosine similarities


def ground_truth_path(cache_dir: Path, gallery: EmbeddingStore, queries: EmbeddingStore, k: int) -> Path:
    return Path(cache_dir) / "groundtruth" / f"{gallery.path.name}__{queries.path.name}__k{k}__v{VERSION}.npz"


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, k: int, block_rows: int = 65536,
                query_chunk: int = 2048, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each query's k most similar gallery rows, best first, exact in float64.

    Memory is bounded by the blocks (query_chunk x block_rows float32 products), not by the gallery."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    candidates = min(len(gallery), k + max(10, k))  # the margin covers float32 near-ties at the k-th place
    best_scores = np.full((len(queries), candidates), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), candidates), dtype=np.int64)
    blocks = range(0, len(gallery), block_rows)
    for start in tqdm(blocks, desc=f"ground truth: top-{k} of {len(queries):,} queries", unit="block",
                      disable=not progress, mininterval=2):
        block = np.ascontiguousarray(gallery[start:start + block_rows], dtype=np.float32)
        for q in range(0, len(queries), query_chunk):
            scores = torch.from_numpy(queries[q:q + query_chunk] @ block.T)
            top = torch.topk(scores, min(candidates, len(block)), dim=1)
            merged_scores = np.concatenate([best_scores[q:q + query_chunk], top.values.numpy()], axis=1)
            merged_ids = np.concatenate([best_ids[q:q + query_chunk], top.indices.numpy() + start], axis=1)
            keep = np.argpartition(-merged_scores, candidates - 1, axis=1)[:, :candidates]
            best_scores[q:q + query_chunk] = np.take_along_axis(merged_scores, keep, axis=1)
            best_ids[q:q + query_chunk] = np.take_along_axis(merged_ids, keep, axis=1)
        release_pages(gallery, start, start + len(block))
    exact = np.empty((len(queries), candidates), dtype=np.float64)
    best_ids.sort(axis=1)  # increasing ids: ties are broken by id
    for q in range(0, len(queries), 256):  # the re-rank: each candidate's similarity, accumulated in float64
        ids = best_ids[q:q + 256]
        rows = gather_rows(gallery, ids.ravel()).reshape(*ids.shape, -1).astype(np.float64)
        exact[q:q + 256] = np.einsum("qcd,qd->qc", rows, queries[q:q + 256].astype(np.float64))
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, axis=1).astype(np.float32), np.take_along_axis(best_ids, order, axis=1)


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
        scores, ids = exact_top_k(gallery.vectors, queries.vectors, k)
        token = uuid.uuid4().hex[:8]
        partial = path.with_name(f".{path.stem}.{token}.npz")
        np.savez(partial, ids=ids, scores=scores)
        partial_meta = path.with_name(f".{path.stem}.{token}.json")
        partial_meta.write_text(json.dumps({"file": describe_files(path.parent, [partial.name])[partial.name]}))
        os.replace(partial, path)
        os.replace(partial_meta, path.with_suffix(".json"))
        return GroundTruth(ids, scores)
