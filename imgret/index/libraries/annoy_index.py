"""Spotify's Annoy: a forest of random-projection trees, metric "dot" (its distance is a·b itself). Searched one
query per call (Annoy has no batch call), on search.threads threads."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.errors import bad_value
from imgret.index.base import Method, run_in_threads, top_k_arrays
from imgret.index.params import BUILD, QUERY, MethodParams, Param


class Annoy(Method):
    name, label = "annoy", "Annoy"
    module, install = "annoy", "annoy==1.17.3"
    params = (Param("n_trees", BUILD), Param("search_k", QUERY, minimum=None))  # search_k: >= 1, or -1
    variant_param = "search_k"
    file_suffix = ".annoy"
    ordering = "inner product (metric 'dot')"

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        search_k = opts.get("search_k")
        if search_k != -1 and not (isinstance(search_k, int) and not isinstance(search_k, bool) and search_k >= 1):
            raise bad_value("method.search_k", search_k, "a whole number of nodes to inspect >= 1, or -1 (Annoy's "
                            "default: n_trees * k)")

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        index = self.library().AnnoyIndex(gallery.shape[1], "dot")
        index.set_seed(0)
        for row, vector in enumerate(gallery):
            index.add_item(row, vector)
        index.build(int(opts["n_trees"]), n_jobs=threads)
        return index

    def save(self, native: Any, path: Path) -> None:
        native.save(str(path))  # Annoy then maps the saved file: it follows the file when the cache renames it

    def meta(self, native: Any) -> dict:
        return {"dim": int(native.f), "count": int(native.get_n_items())}

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        index = self.library().AnnoyIndex(int(meta["dim"]), "dot")
        index.load(str(path))
        return index

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        search_k = int(setting["search_k"])
        return run_in_threads(lambda query: native.get_nns_by_vector(query, k, search_k=search_k,
                                                                     include_distances=True), queries, threads)

    def results(self, found, k: int):
        return top_k_arrays([ids for ids, _ in found], [scores for _, scores in found], k)


METHODS = (Annoy(),)
