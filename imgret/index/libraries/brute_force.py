"""Brute force: exact cosine by matrix products (imgret's own, numpy BLAS and torch.topk)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import Method, SearchIndex, top_k_arrays
from imgret.mapped import gather_rows
from imgret.index.brute import BruteForceIndex
from imgret.index.params import QUERY, MethodParams, Param


class BruteForce(Method):
    name = "brute"
    label = "brute force"
    exact = True
    cached = False  # nothing to build: the gallery itself
    params = (Param("query_chunk", QUERY, execution=True),
              Param("resident_mb", QUERY, minimum=0, execution=True, optional=True))

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        return gallery

    filter_mode = "its own filter (the allowed rows only, exactly)"

    def search_filtered(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int,
                        row_filter, query_ids: np.ndarray):
        rows, values = [], []
        for i, query_id in enumerate(query_ids):
            allowed = np.flatnonzero(row_filter.allowed(int(query_id)))
            similarities = gather_rows(native, allowed) @ queries[i]
            best = np.argsort(-similarities, kind="stable")[:k]
            rows.append(allowed[best])
            values.append(similarities[best])
        return top_k_arrays(rows, values, k)

    def searcher(self, native: Any, setting: Mapping, device: str = "cpu") -> SearchIndex:
        return BruteForceIndex(native, int(setting.get("query_chunk") or 1024), device,
                               int(setting.get("resident_mb", 1024)) << 20)


METHODS = (BruteForce(),)
