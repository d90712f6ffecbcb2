"""The exact top-k of every query: computed once per (gallery store, query store, k), cached, shared.

Computed independently of every search method, in bounded memory however large the gallery: the gallery is
streamed in blocks from its memory map, float32 products pick each query's best k + margin candidates, and
the candidates are re-ranked in float64, so the order is exact. The cache file's size and checksum are
recorded beside it (`.json`) and verified on every load; a damaged file is moved aside and computed again."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgret.cache import Unreadable, file_lock, load_checked, save_checked
from imgret.mapped import gather_rows
from imgret.embed.store import EmbeddingStore
from imgret.index.brute import streamed_top_k
from imgret.index.filters import RowFilter

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
    _, best_ids = streamed_top_k(gallery, queries, candidates, block_rows, query_chunk,
                                 f"ground truth: top-{k} of {len(queries):,} queries" if progress else None)
    exact = np.empty((len(queries), candidates), dtype=np.float64)
    best_ids.sort(axis=1)  # increasing ids: ties are broken by id
    for q in range(0, len(queries), 256):  # the re-rank: each candidate's similarity, accumulated in float64
        ids = best_ids[q:q + 256]
        rows = gather_rows(gallery, ids.ravel()).reshape(*ids.shape, -1).astype(np.float64)
        exact[q:q + 256] = np.einsum("qcd,qd->qc", rows, queries[q:q + 256].astype(np.float64))
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, axis=1).astype(np.float32), np.take_along_axis(best_ids, order, axis=1)


def _read(path: Path, shape: tuple[int, int]) -> GroundTruth:
    try:
        with np.load(path) as cached:
            truth = GroundTruth(cached["ids"], cached["scores"])
    except (OSError, ValueError, KeyError) as error:
        raise Unreadable(f"numpy cannot read it: {error}") from error
    if truth.ids.shape != shape or truth.scores.shape != shape:
        raise Unreadable(f"it holds {truth.ids.shape}, not {shape}")
    return truth


def exact_ground_truth(gallery: EmbeddingStore, queries: EmbeddingStore, k: int, cache_dir: Path) -> GroundTruth:
    path = ground_truth_path(cache_dir, gallery, queries, k)
    with file_lock(path, f"the ground truth {path.name}"):
        truth = load_checked(path, lambda found, meta: _read(found, (len(queries), k)))
        if truth is not None:
            return truth
        log.info("computing exact top-%d for %d queries over %d gallery vectors", k, len(queries), len(gallery))
        scores, ids = exact_top_k(gallery.vectors, queries.vectors, k)
        save_checked(path, lambda partial: np.savez(partial, ids=ids, scores=scores))
        return GroundTruth(ids, scores)


def exact_filtered_top_k(gallery: np.ndarray, queries: np.ndarray, row_filter: RowFilter, k: int,
                         block_rows: int = 65536, query_chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each query's k most similar *allowed* gallery rows, best first, exact in float64 (ties by
    the lower id); -inf and -1 past the rows a query may return. Brute force over the gallery in blocks, the rows
    a query may not return set to -inf before its candidates are picked."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    count = len(queries)
    candidates = min(len(gallery), k + max(10, k))
    best_scores = np.full((count, candidates), -np.inf, dtype=np.float32)
    best_ids = np.full((count, candidates), -1, dtype=np.int64)
    for start in range(0, len(gallery), block_rows):
        block = np.asarray(gallery[start:start + block_rows], dtype=np.float32)
        row_ids = np.arange(start, start + len(block))
        for q in range(0, count, query_chunk):
            chunk = np.arange(q, min(q + query_chunk, count))
            scores = queries[chunk] @ block.T
            scores[~row_filter.block(chunk, start, start + len(block))] = -np.inf
            merged = np.concatenate([best_scores[chunk], scores], axis=1)
            merged_ids = np.concatenate([best_ids[chunk], np.broadcast_to(row_ids, scores.shape)], axis=1)
            top = np.argpartition(-merged, candidates - 1, axis=1)[:, :candidates]
            best_scores[chunk] = np.take_along_axis(merged, top, axis=1)
            best_ids[chunk] = np.where(np.isfinite(best_scores[chunk]), np.take_along_axis(merged_ids, top, axis=1), -1)
    exact = np.full(best_ids.shape, -np.inf, dtype=np.float64)
    for q in range(0, count, 256):  # the re-rank in float64, as the unfiltered ground truth's
        ids = best_ids[q:q + 256]
        rows = gather_rows(gallery, np.maximum(ids, 0).ravel()).reshape(*ids.shape, -1).astype(np.float64)
        exact[q:q + 256] = np.where(ids >= 0, np.einsum("qcd,qd->qc", rows, queries[q:q + 256].astype(np.float64)),
                                    -np.inf)
    order = np.lexsort((np.where(best_ids < 0, np.iinfo(np.int64).max, best_ids), -exact), axis=1)[:, :k]
    return np.take_along_axis(exact, order, axis=1).astype(np.float32), np.take_along_axis(best_ids, order, axis=1)


def exact_filtered_ground_truth(gallery: EmbeddingStore, queries: EmbeddingStore, k: int, cache_dir: Path,
                                row_filter: RowFilter) -> GroundTruth:
    """The exact filtered top-k, cached like the unfiltered one, keyed by the filter too."""
    path = ground_truth_path(cache_dir, gallery, queries, k).with_name(
        f"{gallery.path.name}__{queries.path.name}__k{k}__{row_filter.kind}-{row_filter.digest}__v{VERSION}.npz")
    with file_lock(path, f"the ground truth {path.name}"):
        truth = load_checked(path, lambda found, meta: _read(found, (len(queries), k)))
        if truth is not None:
            return truth
        log.info("computing the exact filtered top-%d (%s) for %d queries over %d gallery vectors", k,
                 row_filter.describe(), len(queries), len(gallery))
        scores, ids = exact_filtered_top_k(gallery.vectors, queries.vectors, row_filter, k)
        save_checked(path, lambda partial: np.savez(partial, ids=ids, scores=scores))
        return GroundTruth(ids, scores)
