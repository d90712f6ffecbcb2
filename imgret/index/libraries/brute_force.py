"""Brute force: exact cosine by matrix products (imgret's own, numpy BLAS and torch.topk)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import Method, SearchIndex
from imgret.index.brute import BruteForceIndex, in_memory
from imgret.index.exact_filtered import ExactGallery, filtered_top_k
from imgret.index.params import QUERY, MethodParams, Param


class BruteForce(Method):
    name = "brute"
    label = "brute force"
    exact = True
    cached = False  # nothing to build: the gallery itself
    params = (Param("query_chunk", QUERY, execution=True),
              Param("resident_mb", QUERY, minimum=0, execution=True, optional=True))

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        """The gallery, held in memory when it fits `resident_mb` (the searcher and the filtered search share it)."""
        return ExactGallery(in_memory(gallery) if gallery.nbytes <= self.resident_bytes(opts) else gallery)

    @staticmethod
    def resident_bytes(setting: Mapping) -> int:
        resident_mb = setting.get("resident_mb")
        return (1024 if resident_mb is None else int(resident_mb)) << 20

    filter_mode = "its own filter (exact: each query's allowed rows only, from a copy of the gallery in key order)"

    def search_filtered(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int,
                        row_filter, query_ids: np.ndarray):
        return filtered_top_k(native, queries, k, row_filter, query_ids,
                              int(setting.get("query_chunk") or 256), self.resident_bytes(setting))

    def searcher(self, native: Any, setting: Mapping, device: str = "cpu") -> SearchIndex:
        rows = native.rows if isinstance(native, ExactGallery) else native
        return BruteForceIndex(rows, int(setting.get("query_chunk") or 1024), device, self.resident_bytes(setting))


METHODS = (BruteForce(),)
