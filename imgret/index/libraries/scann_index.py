"""Google's ScaNN (`pip install scann`, no TensorFlow needed): its pybind searcher, distance "dot_product" (the inner
product on the store's unit rows).

- `scann`: a k-means tree of `num_leaves` (spherical), asymmetric hashing (anisotropic quantisation, 2 dimensions a
  block) scoring the rows of the `leaves_to_search` nearest leaves, then the best `reorder` candidates rescored on
  the full rows (ScaNN's recommended shape: its README's tree + score_ah + reorder). `leaves_to_search` and
  `reorder` are query settings (per call); a setting above the tree's leaves searches them all.
- `scann_exact`: ScaNN's brute force over the float32 rows.
A tree searcher is saved with ScaNN's own `serialize` (a folder, packed by the index cache) and read back with
`load_searcher`. Searched one query per call (`search`), queries spread over the search threads: ScaNN 1.4.2's
batched call chose other leaves than its call per query, its rows depending on the batch they came in, and found
fewer of the exact neighbours at few leaves (recall@10 0.59 against 0.70 at one leaf of 16 on clustered rows).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.errors import bad_value
from imgret.index.base import Method, plain_rows, run_in_threads, top_k_arrays
from imgret.index.folders import FolderIndex, new_folder, pack_folder, unpack_folder
from imgret.index.params import BUILD, QUERY, MethodParams, Param


def absolute(folder) -> str:
    """A folder's absolute path: ScaNN joins the folder it loads with the paths of its assets, so a relative folder
    (a cache under the working directory) given to both would be joined twice."""
    return str(Path(folder.name).resolve())


class Scann(Method):
    module, install = "scann", "scann==1.4.2"
    ordering = "inner product (distance 'dot_product')"

    def library(self):
        super().library()
        from scann.scann_ops.py import scann_ops_pybind

        return scann_ops_pybind

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        searcher = native.index if isinstance(native, FolderIndex) else native
        leaves = min(int(setting["leaves_to_search"]), int(native.graph)) if "leaves_to_search" in setting else -1
        reorder = max(int(setting["reorder"]), k) if "reorder" in setting else -1
        return run_in_threads(lambda query: searcher.search(query, k, reorder, leaves), queries, threads)

    def results(self, found, k: int):
        return top_k_arrays([list(ids) for ids, _ in found], [list(scores) for _, scores in found], k)


class ScannTree(Scann):
    name, label = "scann", "ScaNN tree-AH"
    params = (Param("num_leaves", BUILD, top_level=True), Param("training_sample_size", BUILD, minimum=None),
              Param("anisotropic_threshold", BUILD, minimum=0, above=True, maximum=1, whole=False,
                    meaning="ScaNN's anisotropic_quantization_threshold"),
              Param("leaves_to_search", QUERY, top_level=True), Param("reorder", QUERY))
    variant_param = "leaves_to_search"
    file_suffix = ".scann.tar"

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        super().check(opts, gallery_size, dim)
        if gallery_size is not None and opts["num_leaves"] > gallery_size:
            raise bad_value("method.num_leaves", opts["num_leaves"], f"at most the gallery size ({gallery_size})")
        if dim is not None and dim % 2:
            raise bad_value("dim", dim, "an even dimension (asymmetric hashing takes 2 dimensions a block)")

    def check_k(self, opts: MethodParams, k: int) -> None:
        if opts["reorder"] < k:
            raise bad_value("method.reorder", opts["reorder"], f"at least k ({k}): the candidates rescored on the rows")

    def invalid_combination(self, opts: MethodParams) -> str | None:
        leaves, searched = opts.get("num_leaves"), opts.get("leaves_to_search")
        if isinstance(leaves, int) and isinstance(searched, int) and searched > leaves:
            return f"leaves_to_search={searched} > num_leaves={leaves}"
        return None

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        rows = plain_rows(gallery)
        sample = opts.get("training_sample_size") or min(len(rows), 250_000)
        leaves = int(opts["num_leaves"])
        searcher = (self.library().builder(rows, 10, "dot_product")
                    .tree(num_leaves=leaves, num_leaves_to_search=min(leaves, int(opts["leaves_to_search"])),
                          training_sample_size=int(sample), spherical=True)
                    .score_ah(2, anisotropic_quantization_threshold=float(opts["anisotropic_threshold"]))
                    .reorder(int(opts["reorder"])).set_n_training_threads(threads).build())
        folder = new_folder(path)
        # the saved form is ScaNN's own folder, its assets named relative to it (by default ScaNN records where they
        # were written, which the index cache's copy unpacked elsewhere would not find): loaded back from it
        searcher.serialize(absolute(folder), relative_path=True)
        return FolderIndex(self.library().load_searcher(absolute(folder)), folder, str(leaves))

    def save(self, native: FolderIndex, path: Path) -> None:
        pack_folder(native.path, path)

    def meta(self, native: FolderIndex) -> dict:
        return {"num_leaves": int(native.graph)}

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        folder = unpack_folder(path)
        return FolderIndex(self.library().load_searcher(absolute(folder)), folder, str(meta["num_leaves"]))


class ScannExact(Scann):
    name, label = "scann_exact", "ScaNN brute force"
    exact = True
    cached = False  # nothing is trained: building is copying the rows

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        return self.library().builder(plain_rows(gallery), 10, "dot_product").score_brute_force().build()

    def save(self, native: Any, path: Path) -> None:
        """ScaNN's own folder (never cached: how a run measures the index's size, the rows it holds)."""
        path.mkdir(parents=True)
        native.serialize(str(path), relative_path=True)


METHODS = (ScannTree(), ScannExact())
