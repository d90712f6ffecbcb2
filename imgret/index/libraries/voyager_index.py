"""Spotify's Voyager (HNSW), Space.InnerProduct (distance 1 - a·b); its query ef is set per call."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import ADD_CHUNK_ROWS, Method, plain_rows
from imgret.index.params import HnswGraph, MethodParams


class Voyager(HnswGraph, Method):
    name, label = "voyager", "Voyager HNSW"
    module, install = "voyager", "voyager==2.2.3"
    file_suffix = ".voyager"
    ordering = "inner product (Space.InnerProduct, distance 1 - a·b)"

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        voyager = self.library()
        index = voyager.Index(voyager.Space.InnerProduct, num_dimensions=gallery.shape[1], M=int(opts["hnsw_m"]),
                              ef_construction=int(opts["ef_construction"]), random_seed=1,
                              max_elements=len(gallery), storage_data_type=voyager.StorageDataType.Float32)
        for start in range(0, len(gallery), ADD_CHUNK_ROWS):
            rows = plain_rows(gallery[start:start + ADD_CHUNK_ROWS])
            index.add_items(rows, ids=list(range(start, start + len(rows))), num_threads=threads)
        return index

    def save(self, native: Any, path: Path) -> None:
        native.save(str(path))

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        return self.library().Index.load(str(path))

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        return native.query(queries, k, num_threads=threads, query_ef=int(setting["ef_search"]))

    def results(self, found, k: int):
        ids, distances = found  # float32, and uint64 row numbers: viewed as int64, not copied
        return 1 - distances, ids.view(np.int64)


METHODS = (Voyager(),)
