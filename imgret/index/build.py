"""Building an index, once: trained on a sample, filled in chunks from the gallery's memory map (or, with
`on_disk`, shard by shard into a memory-mapped `.ivfdata` file), saved atomically under the index cache keyed by
the gallery and the build parameters, verified when loaded; a GPU copy when faiss-gpu and `device=cuda` say so.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import threading
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from imgret.cache import (Unreadable, file_lock, gather_rows, load_checked, release_pages, return_freed_memory,
                          save_checked)
from imgret.errors import ConfigError, allowed, bad_value
from imgret.index.methods import (ADD_CHUNK_ROWS, METHODS, BruteForceIndex, BuiltIndex, FaissIndex,
                                  factory_index, apply_query_params, validate_search)

log = logging.getLogger(__name__)

ON_DISK_SHARD_ROWS = 8 * ADD_CHUNK_ROWS


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
        return factory_index(method_cfg, dim)
    raise bad_value("method", name, f"one of {allowed(METHODS)}")


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


def _read_index(path: Path, meta: dict) -> tuple[faiss.Index, dict]:
    try:  # on-disk inverted lists are found beside the index, wherever the cache has moved
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if "lists_file" in meta else 0), meta
    except RuntimeError as error:
        raise Unreadable(f"faiss cannot read it: {str(error).strip().splitlines()[-1]}") from error


def _load_verified(path: Path) -> tuple[faiss.Index, dict] | None:
    """A saved index and its meta, if both are there and match their recorded checksums (None: build it)."""
    return load_checked(path, _read_index, companions={"lists_file": ".ivfdata"})


def _save_atomically(faiss_index: faiss.Index, path: Path, meta: dict) -> None:
    lists_path = path.with_suffix(".ivfdata")
    on_disk = faiss.try_extract_index_ivf(faiss_index) is not None and lists_path.exists()
    save_checked(path, lambda partial: faiss.write_index(faiss_index, str(partial)), meta,
                 companions={"lists_file": lists_path} if on_disk else None)
