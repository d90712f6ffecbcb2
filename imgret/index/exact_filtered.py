"""Exact search under a filter, never more work than the unfiltered exact scan.

Every filter allows each query a range of keys (`RowFilter`: low <= key < high). A gallery held in memory is copied
once per filter's keys into key order (`KeyOrder`: a stable argsort of the keys, the rows gathered in that order), so
that each query's allowed rows are one contiguous slice:
- one query multiplies its slice alone: the rows it may return, and no others, read once;
- a batch is taken in chunks of queries ordered by where their slices start, each chunk multiplied by the union of
  its slices (one matrix product, shared as in the unfiltered batch) and every query's scores outside its own slice
  set to -inf before its top k: the union is at most the whole gallery, and shrinks with the filter.
A memory-mapped gallery larger than memory is not copied: a query allowed a small share of it reads only its allowed
rows (gathered), the others scan it in blocks with the disallowed rows masked (`GATHER_SHARE_*`).
`python -m imgret.bench --parts filtered` measures these against the unfiltered scan.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from imgret.index.base import ADD_CHUNK_ROWS
from imgret.index.brute import streamed_top_k
from imgret.index.filters import RowFilter
from imgret.mapped import gather_rows, is_mapped

# A memory-mapped gallery: a query allowed fewer than this share of it gathers its rows, the others scan masked.
# Gathering a share s reads, writes and multiplies s of the rows (about 3 s of a scan's bytes) where one query's scan
# reads them all once; in a batch the scan is a matrix product the batch's queries share, compute-bound.
GATHER_SHARE_ONE_QUERY = 0.25
GATHER_SHARE_BATCH = 1 / 64


@dataclass(frozen=True)
class KeyOrder:
    """The gallery's rows in the order of one filter's keys: `rows[i]` is gallery row `order[i]`, whose key is
    `keys[i]` (ascending)."""
    digest: str
    order: np.ndarray
    keys: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, gallery: np.ndarray, row_filter: RowFilter) -> "KeyOrder":
        order = np.argsort(row_filter.keys, kind="stable")
        return cls(row_filter.keys_digest, order, row_filter.keys[order], np.ascontiguousarray(gallery[order]))

    def slices(self, row_filter: RowFilter, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each query's allowed rows start and stop in `rows`."""
        return (np.searchsorted(self.keys, row_filter.low[query_ids]),
                np.searchsorted(self.keys, row_filter.high[query_ids]))


@dataclass(eq=False)
class ExactGallery:
    """Brute force's index: the gallery (in memory, or memory-mapped when larger than `resident_bytes`), and its
    rows in the order of the last filter's keys it searched under (one at a time: a copy of the gallery)."""
    rows: np.ndarray
    key_order: KeyOrder | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ordered_by(self, row_filter: RowFilter) -> KeyOrder | None:
        if is_mapped(self.rows):
            return None
        with self.lock:
            if self.key_order is None or self.key_order.digest != row_filter.keys_digest:
                self.key_order = None  # the last filter's copy released before the next is made
                self.key_order = KeyOrder.of(self.rows, row_filter)
            return self.key_order


def filtered_top_k(gallery: np.ndarray | ExactGallery, queries: np.ndarray, k: int, row_filter: RowFilter,
                   query_ids: np.ndarray, query_chunk: int = 256, resident_bytes: int = 1 << 30
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each query's k best rows among those `row_filter` allows it (query `query_ids[i]`), best
    first; -inf and -1 past the rows it may return."""
    exact = gallery if isinstance(gallery, ExactGallery) else ExactGallery(gallery)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    ordered = exact.ordered_by(row_filter)
    if ordered is not None:
        _ordered_top_k(ordered, queries, k, row_filter, query_ids, query_chunk, scores, ids)
    else:
        _mapped_top_k(exact.rows, queries, k, row_filter, query_ids, query_chunk, resident_bytes, scores, ids)
    return scores, ids


def _ordered_top_k(ordered: KeyOrder, queries: np.ndarray, k: int, row_filter: RowFilter, query_ids: np.ndarray,
                   query_chunk: int, scores: np.ndarray, ids: np.ndarray) -> None:
    starts, stops = ordered.slices(row_filter, query_ids)
    if len(queries) == 1:  # one matrix-vector product over the query's own rows
        start, stop = int(starts[0]), int(stops[0])
        if stop > start:
            _keep(torch.from_numpy(ordered.rows[start:stop] @ queries[0])[None], start, ordered, k, scores[:1], ids[:1])
        return
    by_start = np.argsort(starts, kind="stable")
    for first in range(0, len(by_start), query_chunk):
        chunk = by_start[first:first + query_chunk]
        start, stop = int(starts[chunk].min()), int(stops[chunk].max())
        if stop <= start:
            continue
        similarities = queries[chunk] @ ordered.rows[start:stop].T
        for row, query in enumerate(chunk):  # each query's scores outside its own slice
            similarities[row, :max(int(starts[query]) - start, 0)] = -np.inf
            similarities[row, max(int(stops[query]) - start, 0):] = -np.inf
        found_scores, found_ids = scores[chunk], ids[chunk]
        _keep(torch.from_numpy(similarities), start, ordered, k, found_scores, found_ids)
        scores[chunk], ids[chunk] = found_scores, found_ids


def _keep(similarities: torch.Tensor, start: int, ordered: KeyOrder, k: int, scores: np.ndarray, ids: np.ndarray
          ) -> None:
    """Each row's top k of `similarities` (columns from `start` of the key-ordered rows) into `scores` and `ids` as
    gallery rows; -1 where a score is -inf (a query with fewer allowed rows than k)."""
    top = torch.topk(similarities, min(k, similarities.shape[1]), dim=1)
    width = top.values.shape[1]
    scores[:, :width] = top.values.numpy()
    ids[:, :width] = np.where(np.isfinite(scores[:, :width]), ordered.order[start + top.indices.numpy()], -1)


def _mapped_top_k(gallery: np.ndarray, queries: np.ndarray, k: int, row_filter: RowFilter, query_ids: np.ndarray,
                  query_chunk: int, resident_bytes: int, scores: np.ndarray, ids: np.ndarray) -> None:
    limit = GATHER_SHARE_ONE_QUERY if len(queries) == 1 else GATHER_SHARE_BATCH
    gathered = row_filter.allowed_counts(query_ids) < limit * len(gallery)
    for i in np.flatnonzero(gathered):
        allowed = np.flatnonzero(row_filter.allowed(int(query_ids[i])))
        similarities = gather_rows(gallery, allowed) @ queries[i]
        top = torch.topk(torch.from_numpy(similarities), min(k, len(allowed)))
        scores[i, :len(top.values)], ids[i, :len(top.values)] = top.values.numpy(), allowed[top.indices.numpy()]
    scanned = np.flatnonzero(~gathered)
    if len(scanned):
        chosen = query_ids[scanned]
        streamed = gallery.nbytes > resident_bytes
        found_scores, found_ids = streamed_top_k(
            gallery, queries[scanned], min(k, len(gallery)), ADD_CHUNK_ROWS if streamed else len(gallery), query_chunk,
            masks=lambda q, q_stop, start, stop: row_filter.block(chosen[q:q_stop], start, stop), release=streamed)
        found_ids[~np.isfinite(found_scores)] = -1
        scores[scanned, :found_scores.shape[1]], ids[scanned, :found_ids.shape[1]] = found_scores, found_ids
