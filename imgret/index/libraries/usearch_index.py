"""USearch: its HNSW index, and its exact mode (a brute-force scan by its own SIMD kernels), metric "ip"
(distance 1 - a·b). The HNSW index keeps its rows as USearch's `dtype`: f32, or its own quantisation (f16, i8:
`quantisation=fp16|sq8`), its graph walked on those; refine_factor > 1 re-ranks the best k x F by the full rows read
from the gallery store."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import ADD_CHUNK_ROWS, Method, plain_rows, top_k_arrays
from imgret.index.params import BUILD, QUANTISATION, QUERY, REFINE, MethodParams, Param


def _similarity(distances: np.ndarray) -> np.ndarray:
    return 1 - distances  # metric "ip": distance 1 - a·b


def _matches(found, k: int) -> tuple[np.ndarray, np.ndarray]:
    """USearch's matches as (similarities, rows), -1 past each query's count. Its keys are uint64 row numbers:
    viewed as int64, not copied (each numpy call after a search costs several µs, see `top_k_arrays`)."""
    keys, distances = found.keys, found.distances
    if keys.ndim == 1:  # one query's Matches: as many keys as it found
        if len(keys) < k:
            return top_k_arrays([keys.view(np.int64)], [distances], k, _similarity)
        return _similarity(distances).reshape(1, k), keys.view(np.int64).reshape(1, k)
    keys, scores = keys.view(np.int64), _similarity(distances)
    counts = found.counts
    if len(counts) and counts.min() < k:
        missing = np.arange(k)[None, :] >= counts.reshape(-1, 1)
        keys[missing], scores[missing] = -1, -np.inf
    return scores, keys


class USearch(Method):
    name, label = "usearch", "USearch HNSW"
    module, install = "usearch.index", "usearch==2.26.6"
    params = (Param("connectivity", BUILD), Param("expansion_add", BUILD), QUANTISATION,
              Param("ef_search", QUERY, top_level=True), REFINE)
    variant_param = "ef_search"
    file_suffix = ".usearch"
    ordering = "inner product (metric 'ip', distance 1 - a·b)"
    quantisations = {"none": "f32", "fp16": "f16", "sq8": "i8"}  # its dtype

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        index = self.library().Index(ndim=gallery.shape[1], metric="ip", dtype=self.quantisations[self.codes(opts)],
                                     connectivity=int(opts["connectivity"]), expansion_add=int(opts["expansion_add"]))
        for start in range(0, len(gallery), ADD_CHUNK_ROWS):
            rows = plain_rows(gallery[start:start + ADD_CHUNK_ROWS])
            index.add(np.arange(start, start + len(rows)), rows, threads=threads)
        return index

    def save(self, native: Any, path: Path) -> None:
        native.save(str(path))

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        return self.library().Index.restore(str(path))

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        native.expansion_search = int(setting["ef_search"])  # on the index: searched under its lock
        return native.search(queries, k, threads=threads)

    def results(self, found, k: int):
        return _matches(found, k)


class USearchExact(Method):
    name, label = "usearch_exact", "USearch exact"
    module, install = "usearch.index", "usearch==2.26.6"
    exact, cached = True, False
    ordering = "inner product (metric 'ip', exact=True: every row compared)"

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        return plain_rows(gallery)

    def save(self, native: Any, path: Path) -> None:
        np.save(path, native)  # only for its size: an exact scan keeps the gallery itself

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int):
        return self.library().search(native, queries, k, "ip", exact=True, threads=threads)

    def results(self, found, k: int):
        return _matches(found, k)


METHODS = (USearch(), USearchExact())
