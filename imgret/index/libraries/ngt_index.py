"""Yahoo Japan's NGT: its ANNG graph, optionally reconstructed into ONNG (degrees optimised: NGT's best performer in
ann-benchmarks), distance type "Normalized Cosine" (1 - a·b of the rows normalised again: the inner product's order on the store's
unit rows; NGT's own "Inner Product" maps rows to L2 in one more dimension). Searched with its epsilon (how far past
the current k-th best the search keeps expanding), one query per call: ngtpy's batch_search returned other rows than
its search here (ngt 2.8.0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import ADD_CHUNK_ROWS, Method, plain_rows, run_in_threads, top_k_arrays
from imgret.index.folders import FolderIndex, new_folder, pack_folder, unpack_folder
from imgret.index.params import BUILD, QUERY, MethodParams, Param


class NGT(Method):
    name, label = "ngt", "NGT"
    module, install = "ngtpy", "ngt==2.8.0.post1"
    params = (*(Param(name, BUILD, minimum=0) for name in ("edge_size_for_creation", "onng_outgoing", "onng_incoming")),
              Param("epsilon", QUERY, minimum=-1, above=True, maximum=10, whole=False, meaning="NGT's default 0.1"),
              Param("edge_size", QUERY, minimum=-2))
    variant_param = "epsilon"
    file_suffix = ".ngt.tar"
    concurrent_searches = False  # its Python binding documents no thread safety for searches of one index
    ordering = "inner product (distance type 'Normalized Cosine', 1 - a·b on unit rows)"

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        ngtpy = self.library()
        folder = new_folder(path)
        anng = str(Path(folder.name) / "anng")
        ngtpy.create(anng, gallery.shape[1], edge_size_for_creation=int(opts["edge_size_for_creation"]),
                     distance_type="Normalized Cosine", object_type="Float")
        index = ngtpy.Index(anng, log_disabled=True)
        for start in range(0, len(gallery), ADD_CHUNK_ROWS):
            rows = plain_rows(gallery[start:start + ADD_CHUNK_ROWS])
            index.batch_insert(rows, num_threads=threads)
        index.save()
        index.close()
        graph = anng
        if opts["onng_outgoing"] and opts["onng_incoming"]:
            graph = str(Path(folder.name) / "onng")
            optimizer = ngtpy.Optimizer(num_of_outgoings=int(opts["onng_outgoing"]),
                                        num_of_incomings=int(opts["onng_incoming"]), log_disabled=True)
            # the graph only: its search-parameter tuning and accuracy table take far longer, and imgret sweeps
            # the search parameters itself
            optimizer.set_processing_modes(search_parameter_optimization=False,
                                           prefetch_parameter_optimization=False, accuracy_table_generation=False)
            optimizer.execute(anng, graph)
        return FolderIndex(ngtpy.Index(graph, read_only=True, log_disabled=True), folder, Path(graph).name)

    def save(self, native: FolderIndex, path: Path) -> None:
        pack_folder(native.path, path)

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        folder = unpack_folder(path)
        graph = "onng" if (Path(folder.name) / "onng").exists() else "anng"
        return FolderIndex(self.library().Index(str(Path(folder.name) / graph), read_only=True, log_disabled=True),
                           folder, graph)

    def bare(self, native: FolderIndex, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        epsilon, edge_size = float(setting["epsilon"]), int(setting.get("edge_size", -2))
        return run_in_threads(lambda query: native.index.search(query, size=k, epsilon=epsilon, edge_size=edge_size),
                              queries, threads)

    def results(self, found, k: int):
        return top_k_arrays([[row for row, _ in pairs] for pairs in found],
                            [[distance for _, distance in pairs] for pairs in found], k, lambda d: 1 - d)


METHODS = (NGT(),)
