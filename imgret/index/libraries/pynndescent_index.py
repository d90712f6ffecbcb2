"""PyNNDescent: a nearest-neighbour-descent graph (pure Python on numba), metric "dot" (distance 1 - a·b), searched
with its epsilon (how far past the current k-th best the search keeps expanding)."""
from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import Method, plain_rows
from imgret.index.params import BUILD, QUERY, MethodParams, Param


@functools.cache
def _finisher():
    """PyNNDescent's answer as imgret's arrays in one compiled call: done with numpy, its three calls (cast the
    rows, turn distances into similarities, mark what was not found) cost ~7 µs after a search has pushed numpy
    out of the CPU caches, 3% of a 0.27 ms query; compiled, ~3 µs. Compiled when an index is built or loaded,
    never in a timed search."""
    import numba

    @numba.njit(nogil=True)
    def finish(ids, distances):
        scores = np.empty(ids.shape, np.float32)
        rows = np.empty(ids.shape, np.int64)
        for i in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                rows[i, j] = ids[i, j]
                scores[i, j] = -np.inf if ids[i, j] < 0 else 1.0 - distances[i, j]
        return scores, rows

    finish(np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float64))  # the types its query returns
    return finish


class PyNNDescent(Method):
    name, label = "pynndescent", "PyNNDescent"
    module, install = "pynndescent", "pynndescent==0.7.0"
    params = (Param("n_neighbors", BUILD, minimum=2),
              Param("diversify_prob", BUILD, minimum=0, maximum=1, whole=False, meaning="a probability"),
              Param("pruning_degree_multiplier", BUILD, minimum=0, above=True, whole=False),
              Param("epsilon", QUERY, minimum=0, whole=False))
    variant_param = "epsilon"
    file_suffix = ".pynndescent.pkl"
    ordering = "inner product (metric 'dot', distance 1 - a·b)"

    def _threads(self, threads: int) -> None:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        self._threads(threads)
        index = self.library().NNDescent(
            plain_rows(gallery), metric="dot", n_neighbors=int(opts["n_neighbors"]),
            diversify_prob=float(opts["diversify_prob"]),
            pruning_degree_multiplier=float(opts["pruning_degree_multiplier"]), random_state=0, n_jobs=threads)
        index.prepare()  # the search graph and trees, built now rather than on the first (timed) query
        _finisher()
        return index

    def save(self, native: Any, path: Path) -> None:
        with open(path, "wb") as file:
            pickle.dump(native, file, protocol=pickle.HIGHEST_PROTOCOL)

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        self.library()
        _finisher()
        with open(path, "rb") as file:  # written by imgret's own cache, checked against its recorded sha256
            return pickle.load(file)

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        self._threads(threads)
        return native.query(queries, k, epsilon=float(setting["epsilon"]))

    def results(self, found, k: int):
        return _finisher()(*found)  # int32 rows, -1 past what it found; float64 distances 1 - a·b


METHODS = (PyNNDescent(),)
