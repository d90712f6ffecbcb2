"""Microsoft's DiskANN (diskannpy): its in-memory Vamana graph, metric "mips" (maximum inner product). Its wheel
pins numpy==1.25 yet runs on numpy 2 (pybind11), so it is installed on its own: `pip install --no-deps
diskannpy==0.7.0`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.errors import bad_value
from imgret.index.base import Method, plain_rows, search_threads_now
from imgret.index.folders import FolderIndex, new_folder, pack_folder, unpack_folder
from imgret.index.params import BUILD, QUERY, MethodParams, Param


class Vamana(Method):
    """What DiskANN's two indexes share: the library, the Vamana graph's parameters and the search list."""
    module, install = "diskannpy", "--no-deps diskannpy==0.7.0"
    reports_progress = True  # prints its build's stages
    graph = (Param("graph_degree", BUILD), Param("build_complexity", BUILD))
    complexity = Param("complexity", QUERY, top_level=True)
    variant_param = "complexity"
    concurrent_searches = False  # its searches share a fixed pool of scratch spaces sized when it was opened

    def check_k(self, opts: MethodParams, k: int) -> None:
        if isinstance(opts.get("complexity"), int) and opts["complexity"] < k:
            raise bad_value("complexity", opts["complexity"], f"a search list at least k ({k}) long: DiskANN "
                            "returns no more neighbours than it holds")


class DiskANN(Vamana):
    name, label = "diskann", "DiskANN (in memory)"
    params = (*Vamana.graph,
              Param("alpha", BUILD, minimum=1, whole=False, meaning="DiskANN's pruning slack, 1.2 by default"),
              Vamana.complexity)
    file_suffix = ".diskann.tar"
    ordering = "inner product (distance_metric 'mips')"

    def _open(self, folder, threads: int) -> FolderIndex:
        index = self.library().StaticMemoryIndex(index_directory=folder.name, num_threads=threads,
                                                 initial_search_complexity=64)
        return FolderIndex(index, folder, "ann")

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        folder = new_folder(path)
        self.library().build_memory_index(
            data=plain_rows(gallery), distance_metric="mips", index_directory=folder.name,
            complexity=int(opts["build_complexity"]), graph_degree=int(opts["graph_degree"]),
            alpha=float(opts["alpha"]), num_threads=threads, vector_dtype=np.float32)
        return self._open(folder, threads)

    def save(self, native: FolderIndex, path: Path) -> None:
        pack_folder(native.path, path)

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        return self._open(unpack_folder(path), search_threads_now())

    def bare(self, native: FolderIndex, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        # batch_search even for one query: diskannpy 0.7.0's single-query search returned its first neighbour k
        # times here (mips)
        return native.index.batch_search(queries, k_neighbors=k, complexity=int(setting["complexity"]),
                                         num_threads=threads)

    def results(self, found, k: int):
        return np.asarray(found.distances, dtype=np.float32), np.asarray(found.identifiers, dtype=np.int64)


METHODS = (DiskANN(),)
