"""Search stage: an index over the gallery's L2-normalised vectors, searched by inner product (= cosine).

Every method implements `SearchIndex`: `search(queries, k) -> (scores, ids)`, best first, with id -1
where an approximate index found fewer than k results. Each method's parameters are split into build
parameters (they change the index, so they key the on-disk index cache) and query parameters (applied
to a built or loaded index before searching), so a sweep over nprobe or ef_search builds each index once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from imgret.cache import (damage, describe_files, file_lock, gather_rows, move_aside, release_pages,
                          return_freed_memory)
from imgret.errors import ConfigError, allowed, bad_value

log = logging.getLogger(__name__)

# faiss's k-means wants at least this many training points per centroid, and warns below it.
MIN_POINTS_PER_CENTROID = 39
ADD_CHUNK_ROWS = 65536
ON_DISK_SHARD_ROWS = 8 * ADD_CHUNK_ROWS


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


# Settings that change how a method computes, never what it returns: not part of a run's name or the study's keys.
EXECUTION_PARAMS = ("query_chunk", "resident_mb", "on_disk")


class SearchIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @property
    def nbytes(self) -> int: ...


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
        best_scores = torch.full((len(queries), k), -torch.inf)
        best_ids = torch.zeros((len(queries), k), dtype=torch.int64)
        for start in range(0, len(self.gallery), self.block_rows):
            block = np.ascontiguousarray(self.gallery[start:start + self.block_rows])
            for q in range(0, len(queries), self.query_chunk):
                top = torch.topk(torch.from_numpy(queries[q:q + self.query_chunk] @ block.T), min(k, len(block)), dim=1)
                scores = torch.cat([best_scores[q:q + self.query_chunk], top.values], dim=1)
                ids = torch.cat([best_ids[q:q + self.query_chunk], top.indices + start], dim=1)
                merged = torch.topk(scores, k, dim=1, largest=True, sorted=True)
                best_scores[q:q + self.query_chunk] = merged.values
                best_ids[q:q + self.query_chunk] = torch.gather(ids, 1, merged.indices)
            release_pages(self.gallery, start, start + len(block))
        return best_scores.numpy(), best_ids.numpy()

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


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def on_device(faiss_index: faiss.Index, method_cfg, device: str) -> FaissIndex:
    """The index as searched on `device`: a GPU copy when faiss-gpu is installed and the index type has one
    (HNSW does not); the CPU index otherwise. Built and cached indexes always stay on the CPU."""
    if device != "cuda" or method_cfg.name == "hnsw":
        return FaissIndex(faiss_index)
    if not faiss_has_gpu():
        warnings.warn("device='cuda' but this faiss has no GPU support (install faiss-gpu): searching on the CPU",
                      stacklevel=2)
        return FaissIndex(faiss_index)
    gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss_index)
    if method_cfg.name in ("ivf", "ivfpq"):
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", int(method_cfg.nprobe))
    elif method_cfg.name == "factory" and method_cfg.get("search_params"):
        faiss.GpuParameterSpace().set_index_parameters(gpu_index, str(method_cfg.search_params))
    return FaissIndex(gpu_index, cpu_index=faiss_index)


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


def _whole(value, low: int, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def validate_search(method_cfg, k, gallery_size: int | None = None, dim: int | None = None) -> None:
    """Fail before any extraction or build if the method cannot run. Bounds that depend on the gallery's
    size or the embedding dimension are checked when those are known (None: not yet)."""
    name = method_cfg.get("name")
    if name not in METHODS:
        raise bad_value("method", name, f"one of {allowed(METHODS)}")
    up_to_gallery = f"a whole number from 1 to the gallery size ({gallery_size})" if gallery_size else "a whole number >= 1"
    if not _whole(k, 1, gallery_size):
        raise bad_value("k", k, up_to_gallery)
    if name == "brute" and not _whole(method_cfg.get("query_chunk", 1024), 1):
        raise bad_value("method.query_chunk", method_cfg.query_chunk, "a whole number of queries per matrix product >= 1")
    if name == "brute" and not _whole(method_cfg.get("resident_mb", 1024), 0):
        raise bad_value("method.resident_mb", method_cfg.resident_mb, "a whole number of megabytes >= 0 (0: always stream)")
    if name in ("ivf", "ivfpq"):
        nlist, nprobe = method_cfg.nlist, method_cfg.nprobe
        if not _whole(nlist, 1, gallery_size):
            raise bad_value("nlist", nlist, up_to_gallery)
        if not _whole(nprobe, 1, nlist):
            raise bad_value("nprobe", nprobe, f"a whole number from 1 to nlist ({nlist})")
        if gallery_size:
            _warn_few_training_points(gallery_size, nlist, "nlist")
    if name == "ivfpq":
        if not _whole(method_cfg.pq_nbits, 1, 16):
            raise bad_value("method.pq_nbits", method_cfg.pq_nbits, "a whole number of bits from 1 to 16")
        if not _whole(method_cfg.pq_m, 1) or (dim and dim % method_cfg.pq_m):
            raise bad_value("method.pq_m", method_cfg.pq_m, "a whole number of sub-quantizers that divides the "
                            f"embedding dimension{f' ({dim}): one of {_divisors(dim)}' if dim else ''}")
        if gallery_size:
            _warn_few_training_points(gallery_size, 2 ** method_cfg.pq_nbits, "2**pq_nbits")
    if name == "hnsw":
        for key in ("hnsw_m", "ef_construction", "ef_search"):
            if not _whole(method_cfg[key], 1):
                raise bad_value(f"method.{key}" if key != "ef_search" else key, method_cfg[key], "a whole number >= 1")
    if "on_disk" in METHODS[name].build_params and not isinstance(method_cfg.get("on_disk", False), bool):
        raise bad_value("method.on_disk", method_cfg.on_disk, "true (inverted lists in a file beside the index, "
                        "memory-mapped) or false")
    if name == "factory":
        # Without the dimension, check the grammar with one that every common sub-quantizer count divides.
        index = _factory_index(method_cfg, dim or 8 * 3 * 5 * 7 * 16)
        _apply_search_params(index, method_cfg)
        if method_cfg.get("on_disk") and faiss.try_extract_index_ivf(index) is None:
            raise bad_value("method.on_disk", True, f"false for {method_cfg.index_factory}, which has no inverted "
                            "lists (only IVF indexes keep them on disk)")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 128)


def _factory_index(method_cfg, dim: int) -> faiss.Index:
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


def _new_faiss_index(method_cfg, dim: int) -> faiss.Index:
    name = method_cfg.name
    if name == "flat":
        return faiss.IndexFlatIP(dim)
    if name == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, int(method_cfg.nlist), faiss.METRIC_INNER_PRODUCT)
    if name == "ivfpq":
        if dim % int(method_cfg.pq_m):
            validate_search(method_cfg, 1, dim=dim)  # raises, naming the divisors of dim
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, int(method_cfg.nlist), int(method_cfg.pq_m),
                                int(method_cfg.pq_nbits), faiss.METRIC_INNER_PRODUCT)
    if name == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(method_cfg.hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(method_cfg.ef_construction)
        return index
    if name == "factory":
        return _factory_index(method_cfg, dim)
    raise bad_value("method", name, f"one of {allowed(METHODS)}")


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


def build_params(method_cfg) -> dict:
    return {"method": method_cfg.name, **{key: method_cfg.get(key) for key in METHODS[method_cfg.name].build_params}}


def index_cache_path(cache_dir: Path, gallery_id: str, method_cfg) -> Path:
    params = build_params(method_cfg)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    readable = "-".join(f"{key}{value}" for key, value in params.items()
                        if key not in ("method", "index_factory") and value not in (None, False))
    return Path(cache_dir) / "indexes" / gallery_id / f"{params['method']}{'-' + readable if readable else ''}-{digest}.faiss"


def build_index(method_cfg, gallery: np.ndarray, cache_dir: Path | None = None,
                gallery_id: str | None = None, device: str = "cpu") -> BuiltIndex:
    """The index for `method_cfg` over `gallery`, with its query parameters applied.

    Indexes that train or build a graph are saved under `cache_dir`, keyed by the gallery and the build
    parameters; a later run with the same keys loads the file (and reports the original build time).
    """
    name = method_cfg.name
    if name not in METHODS:
        raise bad_value("method", name, f"one of {allowed(METHODS)}")
    if name == "brute":
        start = time.perf_counter()
        resident_mb = method_cfg.get("resident_mb", 1024)
        index = BruteForceIndex(gallery, int(method_cfg.get("query_chunk", 1024)), device, int(resident_mb) << 20)
        return BuiltIndex(index, time.perf_counter() - start, reused=False)

    path = index_cache_path(cache_dir, gallery_id, method_cfg) if METHODS[name].cached and cache_dir else None
    if path is None:
        return _build(method_cfg, gallery, None, device)
    # One build per index at a time: a concurrent run waits, then loads what the first one saved.
    with file_lock(path, f"the index {path.name}"):
        loaded = _load_verified(path)
        if loaded is not None:
            faiss_index, meta = loaded
            apply_query_params(faiss_index, method_cfg)
            log.info("reusing index %s", path)
            return BuiltIndex(on_device(faiss_index, method_cfg, device), meta["build_s"], True, path)
        return _build(method_cfg, gallery, path, device)


def training_sample(gallery: np.ndarray, method_cfg) -> np.ndarray:
    """A deterministic sample of the gallery for k-means and PQ training: `method.train_size` rows, by default
    64 per IVF list and at least 100,000 (faiss itself uses at most 256 per centroid)."""
    size = method_cfg.get("train_size")
    if size is None:
        size = max(100_000, 64 * int(method_cfg.get("nlist") or 0))
    size = min(int(size), len(gallery))
    if size == len(gallery):
        return np.ascontiguousarray(gallery, dtype=np.float32)
    rows = np.sort(np.random.default_rng(0).choice(len(gallery), size, replace=False))
    return gather_rows(gallery, rows).astype(np.float32, copy=False)


@contextlib.contextmanager
def _working(desc: str, enabled: bool = True):
    """A bar that counts seconds while a faiss call that reports nothing (k-means) runs."""
    bar = tqdm(desc=desc, unit="s", disable=not enabled, bar_format="{desc}: {elapsed}", mininterval=5)
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.update(1)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()


def _add_in_chunks(faiss_index: faiss.Index, gallery: np.ndarray, start: int, stop: int, desc: str,
                   with_ids: bool = False) -> None:
    """Rows [start, stop) of the memory-mapped gallery, a chunk at a time, each chunk's pages released after it."""
    chunks = range(start, stop, ADD_CHUNK_ROWS)
    for chunk_start in tqdm(chunks, desc=desc, unit="chunk", disable=len(chunks) <= 1, mininterval=2):
        chunk_stop = min(stop, chunk_start + ADD_CHUNK_ROWS)
        rows = np.ascontiguousarray(gallery[chunk_start:chunk_stop], dtype=np.float32)
        if with_ids:
            faiss_index.add_with_ids(rows, np.arange(chunk_start, chunk_stop, dtype=np.int64))
        else:
            faiss_index.add(rows)
        release_pages(gallery, chunk_start, chunk_stop)
        return_freed_memory()


def _reserve_codes(faiss_index: faiss.Index, rows: int) -> None:
    """Give a flat-coded index (flat, or HNSW's flat storage) room for every row before adding in chunks.
    Otherwise its code vector doubles as it grows, and each doubling briefly holds the old and the new copy
    (up to twice the index). The vector keeps its capacity when shrunk back."""
    storage = faiss.downcast_index(faiss_index.storage) if isinstance(faiss_index, faiss.IndexHNSW) else faiss_index
    if isinstance(storage, faiss.IndexFlatCodes) and storage.ntotal == 0:
        storage.codes.resize(rows * storage.code_size)
        storage.codes.resize(0)


def _build(method_cfg, gallery: np.ndarray, path: Path | None, device: str) -> BuiltIndex:
    """Train on a sample, then add the gallery in chunks read from its memory map: memory holds the index,
    one chunk and the sample, never a second copy of the whole gallery. With `on_disk`, not even the index:
    its inverted lists are filled shard by shard and merged into a memory-mapped file beside it."""
    faiss_index = _new_faiss_index(method_cfg, gallery.shape[1])
    log.info("building %s over %d vectors", build_params(method_cfg), len(gallery))
    start = time.perf_counter()
    if not faiss_index.is_trained:
        sample = training_sample(gallery, method_cfg)
        with _working(f"training {method_cfg.name} on {len(sample):,} sampled vectors", len(gallery) > ADD_CHUNK_ROWS):
            faiss_index.train(sample)
        del sample
    if method_cfg.get("on_disk"):
        if path is None:
            raise ConfigError("method.on_disk=true needs the index cache (paths.cache) to hold its inverted lists")
        _fill_on_disk(faiss_index, gallery, path, method_cfg.name)
    else:
        _reserve_codes(faiss_index, len(gallery))
        _add_in_chunks(faiss_index, gallery, 0, len(gallery), f"adding to {method_cfg.name}")
    build_s = time.perf_counter() - start
    if path is not None:
        _save_atomically(faiss_index, path, {"build_s": build_s, "params": build_params(method_cfg),
                                             "count": int(faiss_index.ntotal)})
    apply_query_params(faiss_index, method_cfg)
    return BuiltIndex(on_device(faiss_index, method_cfg, device), build_s, reused=False, path=path)


def _fill_on_disk(trained: faiss.Index, gallery: np.ndarray, path: Path, name: str) -> None:
    """faiss's recipe for indexes larger than memory (contrib/ondisk.py): copies of the trained, empty index
    each take a shard of the gallery and are written out; their inverted lists are merged into one
    `.ivfdata` file that the index memory-maps. Memory holds one shard's lists."""
    from faiss.contrib.ondisk import merge_ondisk

    path.parent.mkdir(parents=True, exist_ok=True)
    lists_path = path.with_suffix(".ivfdata")
    lists_path.unlink(missing_ok=True)  # left by a build that was interrupted: never counted as built
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.shards.") as shards_dir:
        shard_paths = []
        for shard_start in range(0, len(gallery), ON_DISK_SHARD_ROWS):
            shard = faiss.clone_index(trained)
            shard_stop = min(len(gallery), shard_start + ON_DISK_SHARD_ROWS)
            _add_in_chunks(shard, gallery, shard_start, shard_stop,
                           f"adding to {name}, shard {len(shard_paths) + 1}", with_ids=True)
            shard_paths.append(str(Path(shards_dir) / f"shard-{len(shard_paths)}.faiss"))
            faiss.write_index(shard, shard_paths[-1])
            del shard
        with _working(f"merging {len(shard_paths)} shards into {lists_path.name}"):
            merge_ondisk(trained, shard_paths, str(lists_path))


def _load_verified(path: Path) -> tuple[faiss.Index, dict] | None:
    """A saved index and its meta, if both are there and the index matches its recorded checksum; a damaged
    one is moved aside (None: build it again)."""
    meta_path = path.with_suffix(".json")
    if not path.is_file() and not meta_path.is_file():
        return None
    lists_path = path.with_suffix(".ivfdata")
    try:
        meta = json.loads(meta_path.read_text())
        expected = {path.name: meta["file"], **({lists_path.name: meta["lists_file"]} if "lists_file" in meta else {})}
        problem = damage(path.parent, expected)
    except (OSError, ValueError, KeyError, TypeError):
        meta, problem = None, "its meta file is missing, unreadable or from an older imgret"
    if problem is None:
        try:
            # on-disk inverted lists are found beside the index, wherever the cache has moved
            return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if "lists_file" in meta else 0), meta
        except RuntimeError as error:
            problem = f"faiss cannot read it: {str(error).strip().splitlines()[-1]}"
    for damaged in (path, meta_path, lists_path):
        if damaged.exists():
            move_aside(damaged, problem)
    return None


def _save_atomically(faiss_index: faiss.Index, path: Path, meta: dict) -> None:
    """Index first, then its meta file with the index's size and checksum: only an index whose meta file
    matches it counts as built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    partial_index = path.with_name(f".{path.name}.{token}")
    faiss.write_index(faiss_index, str(partial_index))
    meta = {**meta, "file": describe_files(path.parent, [partial_index.name])[partial_index.name]}
    lists_path = path.with_suffix(".ivfdata")
    if faiss.try_extract_index_ivf(faiss_index) is not None and lists_path.exists():
        meta["lists_file"] = describe_files(path.parent, [lists_path.name])[lists_path.name]
    os.replace(partial_index, path)
    partial_meta = path.with_name(f".{path.stem}.{token}.json")
    partial_meta.write_text(json.dumps(meta, indent=1))
    os.replace(partial_meta, path.with_suffix(".json"))
