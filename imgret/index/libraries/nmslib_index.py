"""NMSLIB's HNSW, space "negdotprod" (distance -a·b). PyPI's binary wheel is built without SIMD (NMSLIB says so
when imported); `pip install --no-binary :all: nmslib` builds it for this CPU."""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import Method, plain_rows, top_k_arrays
from imgret.index.folders import new_folder, pack_folder, unpack_folder
from imgret.index.params import HnswGraph, MethodParams


class Nmslib(HnswGraph, Method):
    name, label = "nmslib", "NMSLIB HNSW"
    module, install = "nmslib", "nmslib==2.1.2"
    file_suffix = ".nmslib.tar"
    ordering = "inner product (space 'negdotprod', distance -a·b)"

    def library(self):
        # its first index registers ~60 spaces and methods at INFO on the logger "nmslib": a run's log is not for them
        logging.getLogger("nmslib").setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):  # its SIMD notice, printed on import
            return super().library()

    def _new(self):
        nmslib = self.library()
        return nmslib.init(method="hnsw", space="negdotprod", data_type=nmslib.DataType.DENSE_VECTOR)

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        index = self._new()
        index.addDataPointBatch(plain_rows(gallery))
        index.createIndex({"M": int(opts["hnsw_m"]), "efConstruction": int(opts["ef_construction"]), "post": 0,
                           "indexThreadQty": threads}, print_progress=False)
        return index

    def save(self, native: Any, path: Path) -> None:
        with new_folder(path) as folder:
            native.saveIndex(str(Path(folder) / "index"), save_data=True)
            pack_folder(Path(folder), path)

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        index = self._new()
        with unpack_folder(path) as folder:  # read into memory: the files can go
            index.loadIndex(str(Path(folder) / "index"), load_data=True)
        return index

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        native.setQueryTimeParams({"efSearch": int(setting["ef_search"])})  # on the index: under its lock
        return native.knnQueryBatch(queries, k, num_threads=threads)

    def results(self, found, k: int):
        return top_k_arrays([ids for ids, _ in found], [distances for _, distances in found], k, np.negative)


METHODS = (Nmslib(),)
