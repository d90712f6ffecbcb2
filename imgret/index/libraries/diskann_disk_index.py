"""Microsoft's DiskANN, its SSD index: a Vamana graph whose full vectors stay on disk, navigated by product-quantised
codes kept in memory (`search_memory_gb`), metric "l2" (on the store's unit rows, |a - b|² = 2 - 2 a·b: the inner
product's order). The index is read from its folder while it searches, so the folder lives as long as the index."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.libraries.diskann_index import Vamana
from imgret.index.base import plain_rows, search_threads_now
from imgret.index.folders import FolderIndex, new_folder, pack_folder, unpack_folder
from imgret.index.params import BUILD, QUERY, MethodParams, Param


class DiskANNDisk(Vamana):
    name, label = "diskann_disk", "DiskANN (SSD index)"
    params = (*Vamana.graph,
              Param("search_memory_gb", BUILD, minimum=0, whole=False, above=True,
                    meaning="GB for the in-memory PQ codes"),
              Vamana.complexity, Param("beam_width", QUERY), Param("cache_nodes", QUERY, minimum=0, execution=True))
    file_suffix = ".diskann-ssd.tar"
    ordering = "inner product (distance_metric 'l2' on unit rows)"

    def _open(self, folder, opts: MethodParams) -> FolderIndex:
        # I/O contexts, not search threads (each search call says its own): diskannpy 0.7.0 opened with one spins
        # forever in its warm-up (which takes a second context), so a single-thread run would hang here
        index = self.library().StaticDiskIndex(index_directory=folder.name, num_threads=max(2, search_threads_now()),
                                               num_nodes_to_cache=int(opts["cache_nodes"]), distance_metric="l2",
                                               vector_dtype=np.float32)
        return FolderIndex(index, folder, "ann")

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        folder = new_folder(path)
        self.library().build_disk_index(
            data=plain_rows(gallery), distance_metric="l2", index_directory=folder.name,
            complexity=int(opts["build_complexity"]), graph_degree=int(opts["graph_degree"]),
            search_memory_maximum=float(opts["search_memory_gb"]), build_memory_maximum=4.0, num_threads=threads,
            vector_dtype=np.float32)
        return self._open(folder, opts)

    def save(self, native: FolderIndex, path: Path) -> None:
        pack_folder(native.path, path)

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        return self._open(unpack_folder(path), opts)

    def bare(self, native: FolderIndex, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        return native.index.batch_search(queries, k_neighbors=k, complexity=int(setting["complexity"]),
                                         num_threads=threads, beam_width=int(setting["beam_width"]))

    def results(self, found, k: int):
        return (1 - np.asarray(found.distances, dtype=np.float32) / 2), np.asarray(found.identifiers, dtype=np.int64)


METHODS = (DiskANNDisk(),)
