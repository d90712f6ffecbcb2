"""hnswlib's HNSW graph, space "ip" (distance 1 - a·b, so its order is the inner product's)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import ADD_CHUNK_ROWS, Method, plain_rows, top_k_arrays
from imgret.index.params import HnswGraph, MethodParams


class Hnswlib(HnswGraph, Method):
    name, label = "hnswlib", "hnswlib HNSW"
    module, install = "hnswlib", "hnswlib==0.8.0"
    file_suffix = ".hnswlib"
    ordering = "inner product (space 'ip', distance 1 - a·b)"

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        index = self.library().Index(space="ip", dim=gallery.shape[1])
        index.init_index(max_elements=len(gallery), M=int(opts["hnsw_m"]),
                         ef_construction=int(opts["ef_construction"]), random_seed=0)
        index.set_num_threads(threads)
        for start in range(0, len(gallery), ADD_CHUNK_ROWS):
            rows = plain_rows(gallery[start:start + ADD_CHUNK_ROWS])
            index.add_items(rows, np.arange(start, start + len(rows)))
        return index

    def save(self, native: Any, path: Path) -> None:
        native.save_index(str(path))

    def meta(self, native: Any) -> dict:
        return {"dim": int(native.dim), "count": int(native.element_count)}

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        index = self.library().Index(space="ip", dim=int(meta["dim"]))
        index.load_index(str(path))
        return index

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        native.set_ef(int(setting["ef_search"]))  # on the index: searched under its lock
        return native.knn_query(queries, k, num_threads=threads)

    filter_mode = "its own filter (a filter function over row ids)"

    def search_filtered(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int,
                        row_filter, query_ids: np.ndarray):
        native.set_ef(int(setting["ef_search"]))
        rows, values = [], []
        for i, query_id in enumerate(query_ids):
            allowed = row_filter.allowed(int(query_id))
            try:
                found, distances = native.knn_query(queries[i:i + 1], k, num_threads=1,
                                                    filter=lambda row: bool(allowed[row]))
            except RuntimeError:  # fewer than k allowed rows reached: ask for as many as there are, at most
                found, distances = native.knn_query(queries[i:i + 1], min(k, int(allowed.sum())) or 1,
                                                    num_threads=1, filter=lambda row: bool(allowed[row]))
            rows.append(found[0].astype(np.int64))
            values.append(distances[0])
        return top_k_arrays(rows, values, k, lambda distances: 1 - distances)

    def results(self, found, k: int):
        ids, distances = found  # float32, and uint64 row numbers: viewed as int64, not copied
        return 1 - distances, ids.view(np.int64)


METHODS = (Hnswlib(),)
