"""Building an index, once: by its method, saved atomically under the index cache keyed by the gallery and the
build parameters, verified when loaded, searched at the run's query setting."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from imgret.cache import Unreadable, file_lock, load_checked, save_checked
from imgret.index.base import ADD_CHUNK_ROWS, BuiltIndex, Method, search_threads_now, working
from imgret.index.methods import method_of

log = logging.getLogger(__name__)


def build_params(method_cfg) -> dict:
    return {"method": method_cfg.name, **{key: method_cfg.get(key) for key in method_of(method_cfg).build_params}}


def index_cache_path(cache_dir: Path, gallery_id: str, method_cfg) -> Path:
    params = build_params(method_cfg)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    readable = "-".join(f"{key}{value}" for key, value in params.items()
                        if key not in ("method", "index_factory") and value not in (None, False))
    suffix = method_of(method_cfg).file_suffix
    return Path(cache_dir) / "indexes" / gallery_id / f"{params['method']}{'-' + readable if readable else ''}-{digest}{suffix}"


def build_index(method_cfg, gallery: np.ndarray, cache_dir: Path | None = None,
                gallery_id: str | None = None, device: str = "cpu") -> BuiltIndex:
    """The index for `method_cfg` over `gallery`, searched at its query parameters.

    Indexes that train or build a graph are saved under `cache_dir`, keyed by the gallery and the build
    parameters; a later run with the same keys loads the file (and reports the original build time).
    """
    method = method_of(method_cfg)
    method.library()  # a missing library refuses here too, for callers that did not validate first
    setting = method.query_setting(method_cfg)
    path = index_cache_path(cache_dir, gallery_id, method_cfg) if method.cached and cache_dir else None
    if path is None:
        native, build_s = _build(method, method_cfg, gallery, None)
        return BuiltIndex(method.searcher(native, setting, device), build_s, False, None, method, native)
    # One build per index at a time: a concurrent run waits, then loads what the first one saved.
    with file_lock(path, f"the index {path.name}"):
        loaded = load_checked(path, lambda file, meta: (_read(method, file, method_cfg, meta), meta),
                              companions=getattr(method, "companions", None))
        if loaded is not None:
            native, meta = loaded
            log.info("reusing index %s", path)
            return BuiltIndex(method.searcher(native, setting, device), meta["build_s"], True, path, method, native)
        native, build_s = _build(method, method_cfg, gallery, path)
        companions = {key: path.with_suffix(suffix) for key, suffix in getattr(method, "companions", {}).items()
                      if path.with_suffix(suffix).exists()}
        save_checked(path, lambda partial: method.save(native, partial),
                     {"build_s": build_s, "params": build_params(method_cfg), **method.meta(native)},
                     companions=companions or None)
        return BuiltIndex(method.searcher(native, setting, device), build_s, False, path, method, native)


def _build(method: Method, method_cfg, gallery: np.ndarray, path: Path | None):
    log.info("building %s over %d vectors", build_params(method_cfg), len(gallery))
    start = time.perf_counter()
    with working(f"building {method.label} over {len(gallery):,} vectors",
                 len(gallery) > ADD_CHUNK_ROWS and not method.reports_progress):
        native = method.build(method_cfg, gallery, search_threads_now(), path)
    return native, time.perf_counter() - start


def _read(method: Method, path: Path, method_cfg, meta: dict):
    try:
        return method.load(path, method_cfg, meta)
    except Unreadable:
        raise
    except Exception as error:  # a library's own error for a file it cannot read
        raise Unreadable(f"{method.label} cannot read it: {str(error).strip().splitlines()[-1] if str(error) else type(error).__name__}") from error
