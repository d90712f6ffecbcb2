"""Search stage: an index over the gallery's L2-normalised vectors, searched by inner product (= cosine).

Every method implements `SearchIndex`: `search(queries, k) -> (scores, ids)`, best first, with id -1
where an approximate index found fewer than k results. `build_index` validates the method's
parameters against the gallery before any work, then builds and times the index.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Protocol

import faiss
import numpy as np
import torch

from imgret.errors import ConfigError, allowed

log = logging.getLogger(__name__)

METHODS = ("brute", "flat", "ivf")
# faiss's k-means wants at least this many training points per centroid, and warns below it.
MIN_POINTS_PER_LIST = 39


class SearchIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @property
    def nbytes(self) -> int: ...


class BruteForceIndex:
    """Exact cosine: a matrix product per chunk of queries and a partial top-k (torch.topk, no full sort)."""

    def __init__(self, gallery: np.ndarray, query_chunk: int = 1024):
        # torch wants a writable buffer; a store's memory-mapped vectors are read-only, so copy those.
        self.gallery = torch.from_numpy(np.require(gallery, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        self.query_chunk = query_chunk

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = torch.from_numpy(np.require(queries, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(queries), self.query_chunk):
                similarities = queries[start:start + self.query_chunk] @ self.gallery.T
                top = torch.topk(similarities, k, dim=1, largest=True, sorted=True)
                scores[start:start + len(similarities)] = top.values.numpy()
                ids[start:start + len(similarities)] = top.indices.numpy()
        return scores, ids

    @property
    def nbytes(self) -> int:
        return self.gallery.numel() * self.gallery.element_size()


class FaissIndex:
    """Any faiss index, with the query-time parameters it was given applied before every search."""

    def __init__(self, index: faiss.Index):
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    @property
    def nbytes(self) -> int:
        return int(faiss.serialize_index(self.index).nbytes)


def validate_search(method_cfg, k: int, gallery_size: int) -> None:
    """Fail before any extraction or build if the method cannot run on this gallery."""
    name = method_cfg.get("name")
    if name not in METHODS:
        raise ConfigError(f"unknown method={name!r}; allowed: {allowed(METHODS)}")
    if not isinstance(k, int) or not 1 <= k <= gallery_size:
        raise ConfigError(f"k={k!r} must be a whole number from 1 to the gallery size ({gallery_size})")
    if name == "ivf":
        nlist, nprobe = method_cfg.nlist, method_cfg.nprobe
        if not isinstance(nlist, int) or not 1 <= nlist <= gallery_size:
            raise ConfigError(f"nlist={nlist!r} must be a whole number from 1 to the gallery size ({gallery_size})")
        if not isinstance(nprobe, int) or not 1 <= nprobe <= nlist:
            raise ConfigError(f"nprobe={nprobe!r} must be a whole number from 1 to nlist ({nlist})")
        if gallery_size < MIN_POINTS_PER_LIST * nlist:
            warnings.warn(
                f"nlist={nlist} has {gallery_size / nlist:.1f} training points per list (gallery {gallery_size}); "
                f"k-means wants at least {MIN_POINTS_PER_LIST}: consider nlist <= {gallery_size // MIN_POINTS_PER_LIST}",
                stacklevel=2,
            )


def build_index(method_cfg, gallery: np.ndarray) -> tuple[SearchIndex, float]:
    """The index for `method_cfg` over `gallery`, and the seconds it took to build (train + add)."""
    name = method_cfg.name
    dim = gallery.shape[1]
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    start = time.perf_counter()
    if name == "brute":
        index: SearchIndex = BruteForceIndex(gallery, int(method_cfg.get("query_chunk", 1024)))
    elif name == "flat":
        flat = faiss.IndexFlatIP(dim)
        flat.add(gallery)
        index = FaissIndex(flat)
    elif name == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, int(method_cfg.nlist), faiss.METRIC_INNER_PRODUCT)
        ivf.train(gallery)
        ivf.add(gallery)
        ivf.nprobe = int(method_cfg.nprobe)
        index = FaissIndex(ivf)
    else:
        raise ConfigError(f"unknown method={name!r}; allowed: {allowed(METHODS)}")
    return index, time.perf_counter() - start
