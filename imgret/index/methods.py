"""Search stage: an index over the gallery's L2-normalised vectors, searched by inner product (= cosine).

Every method implements `SearchIndex`: `search(queries, k) -> (scores, ids)`, best first, with id -1
where an approximate index found fewer than k results. Each method's parameters are split into build
parameters (they change the index, so they key the on-disk index cache) and query parameters (applied
to a built or loaded index before searching), so a sweep over nprobe or ef_search builds each index once.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from imgret.cache import release_pages
from imgret.errors import allowed, bad_value, whole

log = logging.getLogger(__name__)

# faiss's k-means wants at least this many training points per centroid, and warns below it.
MIN_POINTS_PER_CENTROID = 39
ADD_CHUNK_ROWS = 65536  # rows a streamed pass reads at a time (brute force's blocks, an index's adds)


@dataclass(frozen=True)
class Method:
    build_params: tuple[str, ...]
    query_params: tuple[str, ...]
    cached: bool  # saved to disk after building: it trains or builds a graph, so rebuilding costs


METHODS = {
    "brute": Method((), ("query_chunk", "resident_mb"), cached=False),
    "flat": Method((), (), cached=False),
    "ivf": Method(("nlist", "train_size", "on_disk"), ("nprobe",), cached=True),
    "ivfpq": Method(("nlist", "pq_m", "pq_nbits", "train_size", "on_disk"), ("nprobe",), cached=True),
    "hnsw": Method(("hnsw_m", "ef_construction"), ("ef_search",), cached=True),
    "factory": Method(("index_factory", "train_size", "on_disk"), ("search_params",), cached=True),
}


# How the report and the demo name and draw each method.
METHOD_LABELS = {"brute": "brute force", "flat": "FAISS Flat", "ivf": "FAISS IVF", "ivfpq": "FAISS IVF-PQ",
                 "hnsw": "FAISS HNSW", "factory": "faiss index_factory"}
METHOD_MARKERS = {"brute": "*", "flat": "*", "ivf": "o", "ivfpq": "s", "hnsw": "^", "factory": "D"}


# Settings that change how a method computes, never what it returns: not part of a run's name or the study's keys.
EXECUTION_PARAMS = ("query_chunk", "resident_mb", "on_disk")


class SearchIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @property
    def nbytes(self) -> int: ...


def streamed_top_k(gallery: np.ndarray, queries: np.ndarray, k: int, block_rows: int = ADD_CHUNK_ROWS,
                   query_chunk: int = 1024, progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each query's k largest inner products with the gallery, best first, in float32: one pass
    over the gallery in blocks of `block_rows` (each block's pages released after it), each block's top-k merged
    into every query's best k. Memory is bounded by the blocks, not the gallery. `progress`: a bar's label."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = torch.full((len(queries), k), -torch.inf)
    best_ids = torch.zeros((len(queries), k), dtype=torch.int64)
    blocks = range(0, len(gallery), block_rows)
    for start in tqdm(blocks, desc=progress, unit="block", disable=progress is None, mininterval=2):
        block = np.ascontiguousarray(gallery[start:start + block_rows], dtype=np.float32)
        for q in range(0, len(queries), query_chunk):
            top = torch.topk(torch.from_numpy(queries[q:q + query_chunk] @ block.T), min(k, len(block)), dim=1)
            scores = torch.cat([best_scores[q:q + query_chunk], top.values], dim=1)
            ids = torch.cat([best_ids[q:q + query_chunk], top.indices + start], dim=1)
            merged = torch.topk(scores, k, dim=1, largest=True, sorted=True)
            best_scores[q:q + query_chunk] = merged.values
            best_ids[q:q + query_chunk] = torch.gather(ids, 1, merged.indices)
        release_pages(gallery, start, start + len(block))
    return best_scores.numpy(), best_ids.numpy()


class BruteForceIndex:
    """Exact cosine: chunked matrix products and a partial top-k (torch.topk, no full sort).

    A gallery up to `resident_bytes` is copied into RAM; a larger one stays memory-mapped and is streamed in
    blocks of `block_rows`, each block's pages released after it, so memory does not grow with the gallery.
    The products go through numpy's BLAS (OpenBLAS), which beat torch's MKL here both batched and for single
    queries when the two were compared (`python -m imgret.bench --parts search` measures this choice against
    the matmul peak, the bandwidth limit and faiss). torch.topk selects from the scores without copying them.
    """

    def __init__(self, gallery: np.ndarray, query_chunk: int = 1024, device: str = "cpu",
                 resident_bytes: int = 1 << 30, block_rows: int = ADD_CHUNK_ROWS):
        self.streamed = device == "cpu" and gallery.nbytes > resident_bytes
        self.gallery = gallery if self.streamed else np.array(gallery, dtype=np.float32, order="C")
        self.query_chunk = query_chunk
        self.block_rows = block_rows
        # on a GPU the products and the selection run there, with torch
        self.gallery_on_device = torch.from_numpy(self.gallery).to(device) if device != "cpu" else None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.gallery_on_device is not None:
            return self._search_on_device(queries, k)
        if self.streamed:
            return self._search_streamed(queries, k)
        if len(queries) == 1:  # matrix-vector: bandwidth-bound, one pass over the gallery
            top = torch.topk(torch.from_numpy(self.gallery @ queries[0]), k, largest=True, sorted=True)
            return top.values.numpy()[None], top.indices.numpy()[None]
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.query_chunk):
            similarities = queries[start:start + self.query_chunk] @ self.gallery.T
            top = torch.topk(torch.from_numpy(similarities), k, dim=1, largest=True, sorted=True)
            scores[start:start + len(similarities)] = top.values.numpy()
            ids[start:start + len(similarities)] = top.indices.numpy()
        return scores, ids

    def _search_streamed(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One pass over the gallery, block by block: each block's top-k merged into every query's best k."""
        return streamed_top_k(self.gallery, queries, k, self.block_rows, self.query_chunk)

    def _search_on_device(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        with torch.inference_mode():
            for start in range(0, len(queries), self.query_chunk):
                chunk = torch.from_numpy(queries[start:start + self.query_chunk]).to(self.gallery_on_device.device)
                top = torch.topk(chunk @ self.gallery_on_device.T, k, dim=1, largest=True, sorted=True)
                scores.append(top.values.cpu().numpy())
                ids.append(top.indices.cpu().numpy())
        return np.concatenate(scores), np.concatenate(ids)

    @property
    def nbytes(self) -> int:
        return self.gallery.nbytes


class FaissIndex:
    def __init__(self, index: faiss.Index, cpu_index: faiss.Index | None = None):
        self.index = index  # what searches: the CPU index, or its copy on a GPU
        self.cpu_index = cpu_index if cpu_index is not None else index

    def search(self, queries: np.ndarray, k: int,
               params: faiss.SearchParameters | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`params` (faiss.SearchParametersIVF(nprobe=...), SearchParametersHNSW(efSearch=...)) override the
        index's query parameters for this call only: threads can search one index at different settings."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)

    @property
    def nbytes(self) -> int:
        """The serialised size, counted as faiss writes it: serialize_index would hold a second copy of the
        index (and briefly a third as its buffer grows), gigabytes for a million-row flat index."""
        written = 0

        def count(chunk: bytes) -> int:
            nonlocal written
            written += len(chunk)
            return len(chunk)

        writer = faiss.PyCallbackIOWriter(count)
        faiss.write_index(self.cpu_index, writer)
        del writer  # flushes the last chunk
        return written


@dataclass(frozen=True)
class BuiltIndex:
    index: SearchIndex
    build_s: float  # train + add, as measured when the index was built (also when loaded from the cache)
    reused: bool
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        """The serialised size: a saved index's file size, rather than serialising it again on every run."""
        if self.path is None:
            return self.index.nbytes
        on_disk_lists = self.path.with_suffix(".ivfdata")
        return self.path.stat().st_size + (on_disk_lists.stat().st_size if on_disk_lists.exists() else 0)


def invalid_combination(method_cfg) -> str | None:
    """Why this sweep point cannot run, for combinations a cross-product sweep produces (nprobe > nlist)."""
    method = method_cfg
    nprobe, nlist = method.get("nprobe"), method.get("nlist")
    if isinstance(nprobe, int) and isinstance(nlist, int) and nprobe > nlist:
        return f"nprobe={nprobe} > nlist={nlist}"
    return None


def validate_search(method_cfg, k, gallery_size: int | None = None, dim: int | None = None) -> None:
    """Fail before any extraction or build if the method cannot run. Bounds that depend on the gallery's
    size or the embedding dimension are checked when those are known (None: not yet)."""
    name = method_cfg.get("name")
    if name not in METHODS:
        raise bad_value("method", name, f"one of {allowed(METHODS)}")
    up_to_gallery = f"a whole number from 1 to the gallery size ({gallery_size})" if gallery_size else "a whole number >= 1"
    if not whole(k, 1, gallery_size):
        raise bad_value("k", k, up_to_gallery)
    if name == "brute" and not whole(method_cfg.get("query_chunk", 1024), 1):
        raise bad_value("method.query_chunk", method_cfg.query_chunk, "a whole number of queries per matrix product >= 1")
    if name == "brute" and not whole(method_cfg.get("resident_mb", 1024), 0):
        raise bad_value("method.resident_mb", method_cfg.resident_mb, "a whole number of megabytes >= 0 (0: always stream)")
    if name in ("ivf", "ivfpq"):
        nlist, nprobe = method_cfg.nlist, method_cfg.nprobe
        if not whole(nlist, 1, gallery_size):
            raise bad_value("nlist", nlist, up_to_gallery)
        if not whole(nprobe, 1, nlist):
            raise bad_value("nprobe", nprobe, f"a whole number from 1 to nlist ({nlist})")
        if gallery_size:
            _warn_few_training_points(gallery_size, nlist, "nlist")
    if name == "ivfpq":
        if not whole(method_cfg.pq_nbits, 1, 16):
            raise bad_value("method.pq_nbits", method_cfg.pq_nbits, "a whole number of bits from 1 to 16")
        if not whole(method_cfg.pq_m, 1) or (dim and dim % method_cfg.pq_m):
            raise bad_value("method.pq_m", method_cfg.pq_m, "a whole number of sub-quantizers that divides the "
                            f"embedding dimension{f' ({dim}): one of {_divisors(dim)}' if dim else ''}")
        if gallery_size:
            _warn_few_training_points(gallery_size, 2 ** method_cfg.pq_nbits, "2**pq_nbits")
    if name == "hnsw":
        for key in ("hnsw_m", "ef_construction", "ef_search"):
            if not whole(method_cfg[key], 1):
                raise bad_value(f"method.{key}" if key != "ef_search" else key, method_cfg[key], "a whole number >= 1")
    if "on_disk" in METHODS[name].build_params and not isinstance(method_cfg.get("on_disk", False), bool):
        raise bad_value("method.on_disk", method_cfg.on_disk, "true (inverted lists in a file beside the index, "
                        "memory-mapped) or false")
    if name == "factory":
        # Without the dimension, check the grammar with one that every common sub-quantizer count divides.
        index = factory_index(method_cfg, dim or 8 * 3 * 5 * 7 * 16)
        _apply_search_params(index, method_cfg)
        if method_cfg.get("on_disk") and faiss.try_extract_index_ivf(index) is None:
            raise bad_value("method.on_disk", True, f"false for {method_cfg.index_factory}, which has no inverted "
                            "lists (only IVF indexes keep them on disk)")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 128)


def factory_index(method_cfg, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, str(method_cfg.index_factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise bad_value("method.index_factory", method_cfg.index_factory,
                        f"a faiss index_factory string that builds for dimension {dim} "
                        f"({str(error).strip().splitlines()[-1]})") from error


def _apply_search_params(index: faiss.Index, method_cfg) -> None:
    if not method_cfg.get("search_params"):
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, str(method_cfg.search_params))
    except RuntimeError as error:
        raise bad_value("method.search_params", method_cfg.search_params,
                        f"'name=value' pairs, comma-separated, that {method_cfg.index_factory} has, such as "
                        f"nprobe or efSearch ({str(error).strip().splitlines()[-1]})") from error


def _warn_few_training_points(gallery_size: int, centroids: int, what: str) -> None:
    if gallery_size < MIN_POINTS_PER_CENTROID * centroids:
        warnings.warn(
            f"{what}={centroids} centroids get {gallery_size / centroids:.1f} training points each "
            f"(gallery {gallery_size}); k-means wants at least {MIN_POINTS_PER_CENTROID}",
            stacklevel=3,
        )


def search_parameters(method: str, setting: dict) -> faiss.SearchParameters | None:
    """One call's query parameters (see FaissIndex.search), for the methods whose query parameter has them."""
    if method in ("ivf", "ivfpq") and "nprobe" in setting:
        return faiss.SearchParametersIVF(nprobe=int(setting["nprobe"]))
    if method == "hnsw" and "ef_search" in setting:
        return faiss.SearchParametersHNSW(efSearch=int(setting["ef_search"]))
    return None


def apply_query_params(index: faiss.Index, method_cfg) -> None:
    name = method_cfg.name
    if name in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(method_cfg.nprobe)
    elif name == "hnsw":
        index.hnsw.efSearch = int(method_cfg.ef_search)
    elif name == "factory":
        _apply_search_params(index, method_cfg)
