"""Re-ranking a compressed index's candidates by their full vectors, read from the gallery store.

An index that keeps only compressed codes in memory (IVF-PQ) orders its candidates by approximate similarities. With
`method.refine_factor=F > 1` it returns its best k x F, and these are re-ranked by their exact similarity to the query,
computed from the rows read back from the memory-mapped gallery store (with pread: only those rows are read, and
nothing stays mapped). This is faiss's IndexRefine without a second copy of the gallery: the store is the refine
index, so a gallery larger than memory costs k x F row reads per query, not its size in memory."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np

from imgret.mapped import gather_rows

# Threads reading rows to re-rank: reads wait on the disk rather than on a core, so more than the cores.
READ_THREADS = 8


def refine_factor(setting: Mapping) -> int:
    return int(setting.get("refine_factor") or 1)


# Queries re-ranked at a time: memory holds one block's candidate rows (block x k x F rows), not the whole batch's.
QUERY_BLOCK = 256


def rerank(gallery: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each query's k most similar candidates by exact float32 inner product, best first (ties by the
    candidates' order); -inf and -1 where a query had fewer than k candidates (-1 marks none)."""
    queries = np.asarray(queries, dtype=np.float32)
    scores = np.empty(candidates.shape, dtype=np.float32)
    for start in range(0, len(candidates), QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        scores[block] = exact_scores(gallery, queries[block], candidates[block])
    valid = candidates >= 0
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    ids = np.where(np.isfinite(best), np.take_along_axis(candidates, order, axis=1), -1)
    if best.shape[1] < k:  # fewer candidates than k (a gallery smaller than k x F is not refined deeper)
        pad = k - best.shape[1]
        best = np.pad(best, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return best, ids


def exact_scores(gallery: np.ndarray, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Each query's inner product with each of its candidates' rows, read from the gallery (a row once, however many
    queries ask for it; a -1 candidate scores against row 0, for the caller to mask)."""
    wanted, where = np.unique(np.where(candidates >= 0, candidates, 0), return_inverse=True)
    rows = read_rows(gallery, wanted)[where.reshape(candidates.shape)]
    return np.einsum("qcd,qd->qc", rows.astype(np.float32, copy=False), queries)


def read_rows(gallery: np.ndarray, rows: np.ndarray, part_rows: int = 4096) -> np.ndarray:
    """gallery[rows] (sorted ids), read in parts by several threads when there are many: each part's preads release
    the GIL, so reads from disk overlap, as a batch of queries' re-ranks would otherwise wait on each in turn."""
    if len(rows) <= part_rows:
        return gather_rows(gallery, rows)
    parts = [rows[start:start + part_rows] for start in range(0, len(rows), part_rows)]
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        return np.concatenate(list(pool.map(lambda part: gather_rows(gallery, part), parts)))


class Refined:
    """A searcher whose results are its inner searcher's best k x factor, re-ranked from the gallery store."""

    def __init__(self, inner: Any, gallery: np.ndarray, factor: int):
        self.inner, self.gallery, self.factor = inner, gallery, factor

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, candidates = self.inner.search(queries, min(len(self.gallery), k * self.factor))
        return rerank(self.gallery, queries, candidates, k)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes  # the gallery store is not part of the index


def refined(searcher: Any, setting: Mapping, gallery: np.ndarray | None, by_engine: bool = False) -> Any:
    """`searcher`, re-ranked from `gallery` when the setting asks for it (refine_factor > 1), unless the engine
    re-ranks by that setting itself (`by_engine`: LanceDB's refine_factor, Qdrant's rescoring), which a second
    re-rank here would deepen."""
    factor = 1 if by_engine else refine_factor(setting)
    if factor <= 1:
        return searcher
    if gallery is None:
        raise ValueError("refine_factor > 1 needs the gallery's vectors to re-rank with")
    return Refined(searcher, gallery, factor)
