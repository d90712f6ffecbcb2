"""A built index searched under a filter, the way the timing protocol calls an index: `search(rows, k)`, where the
rows are a slice of the run's query array; their position in it says which queries they are, and so which rows each
may return."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from imgret.index.base import BuiltIndex, plain_rows, search_threads_now
from imgret.index.filters import RowFilter
from imgret.index.refine import refine_factor, rerank


class FilteredSearch:
    def __init__(self, built: BuiltIndex, setting: Mapping, row_filter: RowFilter, queries: np.ndarray):
        self.built, self.setting, self.row_filter, self.queries = built, dict(setting), row_filter, queries

    def query_ids(self, rows: np.ndarray) -> np.ndarray:
        """Which queries `rows` are: their offset in the run's query array (they must be a slice of it)."""
        offset, stride = rows.ctypes.data - self.queries.ctypes.data, self.queries.strides[0]
        start = offset // stride
        if offset % stride or not 0 <= start <= len(self.queries) - len(rows) or rows.strides[0] != stride:
            raise ValueError("a filtered search is given rows of the run's query array only")
        return np.arange(start, start + len(rows))

    def search(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        query_ids, queries = self.query_ids(rows), plain_rows(rows)
        # the best k x factor allowed rows, re-ranked from the gallery (an engine that re-ranks itself: by itself)
        factor = 1 if self.built.method.reranks_itself else refine_factor(self.setting)
        depth = k if factor <= 1 else min(len(self.built.gallery), k * factor)
        found = self.built.search_filtered(queries, depth, self.setting, search_threads_now(), self.row_filter,
                                           query_ids)
        return found if factor <= 1 else rerank(self.built.gallery, queries, found[1], k)

    @property
    def nbytes(self) -> int:
        return self.built.nbytes
