"""Building a FAISS index without a second copy of the gallery: trained on a sample, filled in chunks read from
the gallery's memory map (each chunk's pages released after it), or, with `on_disk`, list by list into a
memory-mapped `.ivfdata` file beside the cached index; a GPU copy when faiss-gpu and `device=cuda` say so."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

import faiss
import numpy as np
from tqdm.auto import tqdm

from imgret.allocator import return_freed_memory
from imgret.mapped import gather_rows, release_pages, written_back
from imgret.errors import ConfigError
from imgret.index.base import ADD_CHUNK_ROWS, working
from imgret.index.params import MethodParams

log = logging.getLogger(__name__)

# faiss's k-means wants at least this many training points per centroid, and warns below it.
MIN_POINTS_PER_CENTROID = 39


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class FaissIndex:
    def __init__(self, index: faiss.Index, cpu_index: faiss.Index | None = None,
                 params: faiss.SearchParameters | None = None):
        self.index = index  # what searches: the CPU index, or its copy on a GPU
        self.cpu_index = cpu_index if cpu_index is not None else index
        # faiss.SearchParametersIVF(nprobe=...), SearchParametersHNSW(efSearch=...): this searcher's query
        # parameters, for its calls only, so threads can search one index at different settings
        self.params = params

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=self.params)

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


def on_device(faiss_index: faiss.Index, setting: Mapping, device: str, params: faiss.SearchParameters | None,
              has_gpu_copy: bool = True) -> FaissIndex:
    """The index as searched on `device`: a GPU copy when faiss-gpu is installed and the index type has one
    (HNSW does not); the CPU index otherwise. Built and cached indexes always stay on the CPU."""
    if device != "cuda" or not has_gpu_copy:
        return FaissIndex(faiss_index, params=params)
    if not faiss_has_gpu():
        warnings.warn("device='cuda' but this faiss has no GPU support (install faiss-gpu): searching on the CPU",
                      stacklevel=2)
        return FaissIndex(faiss_index, params=params)
    gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss_index)
    if "nprobe" in setting:
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", int(setting["nprobe"]))
    elif setting.get("search_params"):
        faiss.GpuParameterSpace().set_index_parameters(gpu_index, str(setting["search_params"]))
    return FaissIndex(gpu_index, cpu_index=faiss_index)


def build_faiss(faiss_index: faiss.Index, opts: MethodParams, gallery: np.ndarray, path: Path | None,
                name: str, lists_path: Path | None = None) -> faiss.Index:
    """Train on a sample, then add the gallery in chunks read from its memory map: memory holds the index,
    one chunk and the sample, never a second copy of the whole gallery. With `on_disk`, not even the index:
    its inverted lists are written straight into a memory-mapped file, `lists_path`."""
    if not faiss_index.is_trained:
        sample = training_sample(gallery, opts)
        with working(f"training {name} on {len(sample):,} sampled vectors", len(gallery) > ADD_CHUNK_ROWS):
            faiss_index.train(sample)
        del sample
    if opts.get("on_disk"):
        if path is None or lists_path is None:
            raise ConfigError("method.on_disk=true needs the index cache (paths.cache) to hold its inverted lists")
        _fill_on_disk(faiss_index, gallery, path, lists_path, name)
    else:
        _reserve_codes(faiss_index, len(gallery))
        _add_in_chunks(faiss_index, gallery, 0, len(gallery), f"adding to {name}")
    return faiss_index


def training_sample(gallery: np.ndarray, opts: MethodParams) -> np.ndarray:
    """A deterministic sample of the gallery for k-means and PQ training: `method.train_size` rows, by default
    64 per IVF list and at least 100,000 (faiss itself uses at most 256 per centroid)."""
    size = opts.get("train_size")
    if size is None:
        size = max(100_000, 64 * int(opts.get("nlist") or 0))
    size = min(int(size), len(gallery))
    if size == len(gallery):
        return np.ascontiguousarray(gallery, dtype=np.float32)
    rows = np.sort(np.random.default_rng(0).choice(len(gallery), size, replace=False))
    return gather_rows(gallery, rows).astype(np.float32, copy=False)


def _add_in_chunks(faiss_index: faiss.Index, gallery: np.ndarray, start: int, stop: int, desc: str) -> None:
    """Rows [start, stop) of the memory-mapped gallery, a chunk at a time, each chunk's pages released after it."""
    for _, _, rows in _chunks(gallery[start:stop], desc):
        faiss_index.add(rows)


def _reserve_codes(faiss_index: faiss.Index, rows: int) -> None:
    """Give a flat-coded index (flat, or HNSW's flat storage) room for every row before adding in chunks.
    Otherwise its code vector doubles as it grows, and each doubling briefly holds the old and the new copy
    (up to twice the index). The vector keeps its capacity when shrunk back."""
    storage = faiss.downcast_index(faiss_index.storage) if isinstance(faiss_index, faiss.IndexHNSW) else faiss_index
    if isinstance(storage, faiss.IndexFlatCodes) and storage.ntotal == 0:
        storage.codes.resize(rows * storage.code_size)
        storage.codes.resize(0)


def _fill_on_disk(trained: faiss.Index, gallery: np.ndarray, path: Path, lists_path: Path, name: str) -> None:
    """Inverted lists written straight into their file, `lists_path`, which the index memory-maps: one pass assigns
    every row to its list (the sizes lay the file out, each list's slot exactly its size, as faiss's merge_ondisk
    lays it out); a second encodes the rows a chunk at a time and writes each list's part at its place. Memory
    holds a chunk and the rows' list numbers; the disk holds the lists once (no shards to merge), and the written
    pages leave the page cache as they go (a memory cap counts dirty pages)."""
    ivf = faiss.extract_index_ivf(trained)
    code_size, nlist = ivf.code_size, ivf.nlist
    path.parent.mkdir(parents=True, exist_ok=True)
    lists_path.unlink(missing_ok=True)  # left by a build that was interrupted: never counted as built
    list_nos = np.empty(len(gallery), dtype=np.int64)
    for start, stop, rows in _chunks(gallery, f"assigning {name}'s rows to lists"):
        list_nos[start:stop] = ivf.quantizer.assign(rows, 1)[:, 0]
    sizes = np.bincount(list_nos, minlength=nlist).astype(np.uint64)
    lists = faiss.OnDiskInvertedLists(nlist, code_size, str(lists_path))
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))  # offsets: each list's codes, then its ids, back to back
    codes_at = np.array([lists.lists.at(j).offset for j in range(nlist)], dtype=np.int64)
    ids_at = codes_at + sizes.astype(np.int64) * code_size
    lists.update_totsize(int(sizes.sum()) * (code_size + 8))  # the file, at its final size
    filled = np.zeros(nlist, dtype=np.int64)
    with open(lists_path, "r+b", buffering=0) as out:
        for start, stop, rows in _chunks(gallery, f"writing {name}'s lists to {lists_path.name}"):
            nos = list_nos[start:stop]
            codes = np.empty((len(rows), code_size), dtype=np.uint8)
            ivf.encode_vectors(len(rows), faiss.swig_ptr(rows), faiss.swig_ptr(nos), faiss.swig_ptr(codes))
            order = np.argsort(nos, kind="stable")  # by list, rows in order within each (as add() appends them)
            bounds = np.flatnonzero(np.diff(nos[order])) + 1
            for part in np.split(order, bounds):
                j, count = int(nos[part[0]]), len(part)
                os.pwrite(out.fileno(), codes[part].tobytes(), int(codes_at[j] + filled[j] * code_size))
                os.pwrite(out.fileno(), (part + start).astype(np.int64).tobytes(), int(ids_at[j] + filled[j] * 8))
                filled[j] += count
            written_back(out.fileno())
    assert np.array_equal(filled, sizes.astype(np.int64)), "every list filled to its size"
    lists.this.disown()  # the index owns its lists from here
    ivf.replace_invlists(lists, True)
    ivf.ntotal = trained.ntotal = len(gallery)


def _chunks(gallery: np.ndarray, desc: str):
    """(start, stop, rows) of each chunk of ADD_CHUNK_ROWS rows of the memory-mapped gallery, with a progress bar
    when there are several. The rows are the map's own pages where they need no conversion: they are released (and
    the heap trimmed) only once the caller is done with them and asks for the next chunk."""
    chunks = range(0, len(gallery), ADD_CHUNK_ROWS)
    for start in tqdm(chunks, desc=desc, unit="chunk", disable=len(chunks) <= 1, mininterval=2):
        stop = min(len(gallery), start + ADD_CHUNK_ROWS)
        yield start, stop, np.ascontiguousarray(gallery[start:stop], dtype=np.float32)
        release_pages(gallery, start, stop)
        return_freed_memory()


def warn_few_training_points(gallery_size: int, centroids: int, what: str) -> None:
    if gallery_size < MIN_POINTS_PER_CENTROID * centroids:
        warnings.warn(
            f"{what}={centroids} centroids get {gallery_size / centroids:.1f} training points each "
            f"(gallery {gallery_size}); k-means wants at least {MIN_POINTS_PER_CENTROID}",
            stacklevel=4,
        )
