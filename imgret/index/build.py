"""Building an index, once: by its method, saved atomically under the index cache keyed by the gallery and the
build parameters, verified when loaded, searched at the run's query setting."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Mapping

import faiss
import numpy as np

from imgret.cache import Unreadable, file_lock, load_checked, save_checked
from imgret.index.filters import RowKeys
from imgret.index.base import ADD_CHUNK_ROWS, BuiltIndex, Method, search_threads_now, working
from imgret.index.methods import MethodSettings
from imgret.index.refine import refined

log = logging.getLogger(__name__)


def build_params(settings: MethodSettings) -> dict:
    return {"method": settings.name, **{key: settings.get(key) for key in settings.method.build_params}}


def index_cache_path(cache_dir: Path, gallery_id: str, settings: MethodSettings, row_keys: RowKeys | None = None
                     ) -> Path:
    """Keyed by the gallery, the build parameters and, for a method that stores them, the rows' filter keys."""
    params = build_params(settings)
    method = settings.method
    readable = "-".join(f"{key}{value}" for key, value in params.items()
                        if key != "method" and key not in method.unnamed_params and value not in (None, False))
    if row_keys is not None:
        params["row_keys"] = row_keys.digest
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    suffix = method.file_suffix
    return Path(cache_dir) / "indexes" / gallery_id / f"{params['method']}{'-' + readable if readable else ''}-{digest}{suffix}"


def build_index(settings: MethodSettings | Mapping, gallery: np.ndarray, cache_dir: Path | None = None,
                gallery_id: str | None = None, device: str = "cpu", row_keys: RowKeys | None = None) -> BuiltIndex:
    """The index `settings` configure over `gallery`, searched at its query parameters (a library caller's mapping
    is converted to MethodSettings here). `row_keys`: what a method that filters by stored columns (a database)
    stores with the rows (default: no classes, the rows' attributes).

    Indexes that train or build a graph are saved under `cache_dir`, keyed by the gallery and the build
    parameters; a later run with the same keys loads the file (and reports the original build time).
    """
    settings = MethodSettings.of(settings)
    method = settings.method
    method.library()  # a missing library refuses here too, for callers that did not validate first
    setting = method.query_setting(settings)
    row_keys = (row_keys or RowKeys.unlabelled(len(gallery))) if method.stores_row_keys else None
    path = index_cache_path(cache_dir, gallery_id, settings, row_keys) if method.cached and cache_dir else None
    if path is None:
        native, build_s = _build(method, settings, gallery, None, row_keys)
        return _searched(method, native, setting, device, gallery, build_s, False, None)
    # One build per index at a time: a concurrent run waits, then loads what the first one saved.
    with file_lock(path, f"the index {path.name}"):
        loaded = load_checked(path, lambda file, meta: (_read(method, file, settings, meta), meta),
                              companions=method.companions or None)
        if loaded is not None:
            native, meta = loaded
            log.info("reusing index %s", path)
            return _searched(method, native, setting, device, gallery, meta["build_s"], True, path)
        native, build_s = _build(method, settings, gallery, path, row_keys)
        companions = {key: path.with_suffix(suffix) for key, suffix in method.companions.items()
                      if path.with_suffix(suffix).exists()}
        save_checked(path, lambda partial: method.save(native, partial),
                     {"build_s": build_s, "params": build_params(settings), **method.meta(native)},
                     companions=companions or None)
        return _searched(method, native, setting, device, gallery, build_s, False, path)


def _searched(method: Method, native, setting: dict, device: str, gallery: np.ndarray, build_s: float, reused: bool,
              path: Path | None) -> BuiltIndex:
    searcher = refined(method.searcher(native, setting, device), setting, gallery, method.reranks_itself)
    return BuiltIndex(searcher, build_s, reused, path, method, native, gallery)


def _build(method: Method, settings: MethodSettings, gallery: np.ndarray, path: Path | None,
           row_keys: RowKeys | None):
    log.info("building %s over %d vectors", build_params(settings), len(gallery))
    threads = search_threads_now()
    before = _entries_of(path)
    start = time.perf_counter()
    try:
        with working(f"building {method.label} over {len(gallery):,} vectors",
                     len(gallery) > ADD_CHUNK_ROWS and not method.reports_progress):
            keys = {} if row_keys is None else {"row_keys": row_keys}
            native = _in_worker_thread(lambda: method.build(settings, gallery, threads, path, **keys), threads)
    except BaseException:
        _remove_partials(path, before)
        raise
    return native, time.perf_counter() - start


def _in_worker_thread(build, threads: int):
    """`build()` in a daemon thread while this one waits in short joins: a signal (Ctrl-C, a scheduler's SIGTERM)
    reaches the main thread's handler within a fraction of a second even while the library's native build runs,
    where it would otherwise wait for the whole build to return. The abandoned thread ends with the process.
    Bindings that keep the GIL through their build (none of the FAISS calls) still delay the handler."""
    outcome: dict = {}

    def work():
        faiss.omp_set_num_threads(threads)  # OpenMP's thread count is per thread: a new one starts at every core
        try:
            outcome["native"] = build()
        except BaseException as error:  # handed to the waiting thread, raised there
            outcome["error"] = error

    worker = threading.Thread(target=work, name="index-build", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.25)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["native"]


def _entries_of(path: Path | None) -> set[Path]:
    return set(path.parent.iterdir()) if path is not None and path.parent.is_dir() else set()


def _remove_partials(path: Path | None, before: set[Path]) -> None:
    """What an interrupted or failed build of `path` left beside it (its work folders, its on-disk lists): never
    counted as built, and removed so the cache holds no part of it. Other entries' files are left alone."""
    if path is None:
        return
    for entry in _entries_of(path) - before:
        if entry.name.startswith(f".{path.stem}.") or entry.stem == path.stem:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _read(method: Method, path: Path, settings: MethodSettings, meta: dict):
    try:
        return method.load(path, settings, meta)
    except Unreadable:
        raise
    except Exception as error:  # a library's own error for a file it cannot read
        raise Unreadable(f"{method.label} cannot read it: {str(error).strip().splitlines()[-1] if str(error) else type(error).__name__}") from error
