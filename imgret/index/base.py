"""What every search method is: a `Method` (its parameters, checks, build, save and load, and a searcher bound
to one query setting), the `SearchIndex` a run times, and the `BuiltIndex` the index cache hands out.

A method lives in one module of `imgret/index/libraries/` (or `databases/`) with one `conf/method/<name>.yaml`; the
registry (`imgret/index/methods.py`) finds it there. Methods of libraries that are not installed stay listed: they
refuse in one line naming what to install, before any work.
"""
from __future__ import annotations

import contextlib
import importlib
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from imgret.errors import ConfigError, bad_value
from imgret.index.filters import RowFilter, keep_allowed, post_filter_depth
from imgret.index.params import BUILD, QUERY, MethodParams, Param, names
from imgret.index.refine import refined

ADD_CHUNK_ROWS = 65536  # rows a streamed pass reads at a time (brute force's blocks, an index's adds)


@contextlib.contextmanager
def working(desc: str, enabled: bool = True):
    """A bar that counts seconds while a library call that reports nothing (k-means, a graph build) runs; it
    moves whenever the call lets Python run (between chunks, or throughout when the binding releases the GIL)."""
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


EXTRAS = {"ann": "ANN library", "db": "vector database"}  # imgret's extras that install methods' libraries


class MissingLibrary(ConfigError):
    """A method whose library is not installed: one line saying what to install."""


class SearchIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @property
    def nbytes(self) -> int: ...


def search_threads_now() -> int:
    """The threads a search may use: the compute threads this process is set to (`threads`, and `search.threads`
    around the timed search, set them through torch), so every library follows the single-thread protocol."""
    return max(1, torch.get_num_threads())


class Method:
    """One search method. Subclasses set the class attributes and implement build/save/load/search.

    Its parameters are declared once, in `params` (imgret/index/params.py), split so that a sweep builds each index
    once: `build_params` change the index (they key the index cache), `query_params` are applied to a built or
    loaded index per search; `execution_params` change how it computes, never what it returns (not in a run's name
    or the study's keys).
    """

    name: str = ""
    label: str = ""  # how the report, the plots and the demo call it
    exact: bool = False
    # what it scores when not the rows themselves (quantised codes): its scores are then not the rows' cosines
    scores_on: str | None = None
    # why no setting reaches the exact top k, where something other than a setting bounds its recall (its codes)
    recall_bound: str | None = None
    cached: bool = True  # saved after building: it trains or builds a graph, so rebuilding costs
    params: tuple[Param, ...] = ()
    variant_param: str | None = None  # the query parameter the demo and the benchmark vary per call
    module: str | None = None  # the Python module it needs
    install: str | None = None  # what installs it (pip requirement), for the refusal
    also_needs: tuple[str, ...] = ()  # other modules it needs (a database's client, its server's package)
    extra: str = "ann"  # the extra of imgret that installs it with its kind
    file_suffix: str = ".index"
    ordering: str = "inner product"  # how it orders by cosine on the L2-normalised store
    reports_progress: bool = False  # shows its own progress while building (else imgret counts the seconds)
    companions: dict[str, str] = {}  # files that belong to a cached index: meta key -> suffix beside it
    unnamed_params: tuple[str, ...] = ()  # build parameters a cache file's name leaves out (they name themselves)
    concurrent_searches: bool = True  # several threads may search one index at once (at one setting)
    filter_mode: str = "post-filter"  # how it searches under a filter: its own filter, or a deeper search post-filtered
    # why its own filter cannot reach the exact filtered top k at any setting (it filters the index's k results)
    filter_recall_bound: str | None = None
    stores_row_keys: bool = False  # keeps the rows' filter keys with them (`RowKeys`: a database's columns)
    reranks_itself: bool = False  # its refine_factor is its engine's own re-ranking (imgret does not re-rank it again)
    # the codes it can keep its rows as, in imgret's words (QUANTISATIONS) -> its engine's own name; empty: full
    # precision only (no `quantisation` parameter)
    quantisations: dict[str, str] = {}

    @property
    def build_params(self) -> tuple[str, ...]:
        return names(self.params, BUILD)

    @property
    def query_params(self) -> tuple[str, ...]:
        return names(self.params, QUERY)

    @property
    def execution_params(self) -> tuple[str, ...]:
        return tuple(param.name for param in self.params if param.execution)

    def setting_words(self, opts: MethodParams, keys) -> list[str]:
        """How a run's name shows these settings: each key run together with its value (nlist256)."""
        return [f"{key}{opts[key]}" for key in keys]

    def choice_label(self, setting: Mapping) -> str:
        """How the demo and the API name one searchable setting: "ivf nlist=256 nprobe=16"."""
        return " ".join([self.name, *(f"{key}={value}" for key, value in setting.items())])

    # ------------------------------------------------------------------ checks

    def library(self) -> ModuleType | None:
        """The module it searches with, imported; a missing one (or one it `also_needs`) refused in one line."""
        if self.module is None:
            return None
        for module in (*self.also_needs, self.module):
            try:
                found = importlib.import_module(module)
            except ImportError as error:
                raise MissingLibrary(
                    f"method={self.name} needs the Python module {module} ({error.msg}): install it with "
                    f"`pip install {self.install}`, or `pip install 'imgret[{self.extra}]'` for every "
                    f"{EXTRAS[self.extra]}") from None
        return found

    def check(self, opts: MethodParams, gallery_size: int | None, dim: int | None) -> None:
        """Refuse parameters it cannot run with (raise bad_value), before any work: here, the bounds its `params`
        declare; a method adds what they cannot say after them. Bounds that depend on the gallery size or the
        dimension are checked when those are known (None: not yet)."""
        for param in self.params:
            param.check(opts)
        if self.unsupported_quantisation(opts):
            raise bad_value("quantisation", self.codes(opts), f"one of {', '.join(self.quantisations)} for "
                            f"method={self.name} (what its engine can keep its rows as)")

    def codes(self, opts: MethodParams) -> str:
        """The quantisation it keeps its rows as: the settings' own, or its first (its default) where a library
        caller gave none."""
        return opts.get("quantisation") or next(iter(self.quantisations), "none")

    def unsupported_quantisation(self, opts: MethodParams) -> str | None:
        """Why its `quantisation` cannot be (a code the engine does not have), or None."""
        if self.quantisations and self.codes(opts) not in self.quantisations:
            return f"quantisation={self.codes(opts)} for method={self.name}: one of {', '.join(self.quantisations)}"
        return None

    def check_k(self, opts: MethodParams, k: int) -> None:
        """Refuse a query setting that cannot return k results (rather than search a setting it is not labelled)."""

    def invalid_combination(self, opts: MethodParams) -> str | None:
        """Why a cross-product sweep's point cannot run (nprobe > nlist), or None."""
        return None

    # ------------------------------------------------------------------ build, save, load

    def build(self, opts: MethodParams, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        """The library's index over `gallery` (rows L2-normalised), built on `threads` threads. `path`: where the
        index cache will save it, for a library that builds on disk beside it (None: not cached)."""
        raise NotImplementedError

    def save(self, native: Any, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path, opts: MethodParams, meta: dict) -> Any:
        raise NotImplementedError

    def meta(self, native: Any) -> dict:
        """What the index cache records beside the file (companion files, counts)."""
        return {}

    def run_metrics(self, native: Any) -> dict[str, float]:
        """What a run logs of this index beyond the common metrics (a database's ingest time, server memory)."""
        return {}

    def close(self, native: Any) -> None:
        """Release what the index holds beyond memory (a server process, connections) at the end of a run."""

    # ------------------------------------------------------------------ search

    def query_setting(self, opts: MethodParams) -> dict:
        return {key: opts.get(key) for key in self.query_params if opts.get(key) is not None}

    def bare(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int) -> Any:
        """The library's own calls for these queries at this setting, and nothing else: what `imgret.bench --parts
        libraries` times imgret's search against."""
        raise NotImplementedError

    def results(self, found: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """What `bare` returned, as (cosine similarities, gallery rows) of each query's k best, best first; row -1
        past what was found."""
        raise NotImplementedError

    def search(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int
               ) -> tuple[np.ndarray, np.ndarray]:
        return self.results(self.bare(native, queries, k, setting, threads), k)

    def searcher(self, native: Any, setting: Mapping, device: str = "cpu") -> SearchIndex:
        return LibrarySearcher(self, native, dict(setting))

    def search_filtered(self, native: Any, queries: np.ndarray, k: int, setting: Mapping, threads: int,
                        row_filter: RowFilter, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each query's k best rows among those `row_filter` allows it (query `query_ids[i]`), padded with -inf
        and -1. Here: a search `post_filter_depth` deep, its allowed results kept; a method with a filter of its
        own overrides this (and says so in `filter_mode`)."""
        scores, ids = self.search(native, queries, post_filter_depth(k, row_filter), setting, threads)
        return keep_allowed(row_filter, query_ids, scores, ids, k)

    def filter_plan(self, native: Any, queries: np.ndarray, k: int, row_filter: RowFilter) -> str | None:
        """How the engine chose to search under this filter (a database's query plans), where it chooses."""
        return None


class SettingGate:
    """Searches of one index at the same query setting run at once (concurrent clients); a search at another
    setting waits until they are done, for libraries that keep the setting on the index rather than per call
    (the demo's variants share an index). A method that cannot search from several threads at once admits one."""

    def __init__(self, concurrent: bool):
        self.concurrent = concurrent
        self.condition = threading.Condition()
        self.setting: dict | None = None
        self.active = 0

    @contextlib.contextmanager
    def at(self, setting: dict):
        with self.condition:
            self.condition.wait_for(lambda: self.active == 0 or (self.concurrent and self.setting == setting))
            self.setting, self.active = setting, self.active + 1
        try:
            yield
        finally:
            with self.condition:
                self.active -= 1
                self.condition.notify_all()


class LibrarySearcher:
    """A built index searched at one query setting. Several searchers share an index (the demo's variants, and
    concurrent clients) through its `SettingGate`."""

    _gates: dict[int, SettingGate] = {}
    _gates_lock = threading.Lock()

    def __init__(self, method: Method, native: Any, setting: dict):
        self.method, self.native, self.setting = method, native, setting
        with self._gates_lock:
            self.gate = self._gates.setdefault(id(native), SettingGate(method.concurrent_searches))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = plain_rows(queries)
        with self.gate.at(self.setting):
            return self.method.search(self.native, queries, k, self.setting, search_threads_now())

    @property
    def nbytes(self) -> int:
        with tempfile.TemporaryDirectory() as folder:  # an index that was not cached: its size as saved
            self.method.save(self.native, Path(folder) / f"index{self.method.file_suffix}")
            return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@dataclass(frozen=True)
class BuiltIndex:
    """The index a run holds, built or loaded: it owns the engine's handle (`native`: the library's index, or a
    database's `Database`), and callers search it (at any setting, under a filter), measure it and close it."""

    index: SearchIndex  # searched at the run's query setting
    build_s: float  # train + add, as measured when the index was built (also when loaded from the cache)
    reused: bool
    path: Path | None = None
    method: Method | None = None
    native: Any = None  # the library's own index, for searchers at other query settings
    gallery: np.ndarray | None = None  # the gallery's memory map, to re-rank from (method.refine_factor)

    @property
    def nbytes(self) -> int:
        """The serialised size: a saved index's files, rather than serialising it again on every run."""
        if self.path is None:
            return self.index.nbytes
        beside = [self.path.with_suffix(suffix) for suffix in (self.method.companions if self.method else {}).values()]
        return self.path.stat().st_size + sum(path.stat().st_size for path in beside if path.exists())

    def at(self, setting: Mapping, device: str = "cpu") -> SearchIndex:
        """The same index searched at another query setting."""
        return refined(self.method.searcher(self.native, setting, device), setting, self.gallery,
                       self.method.reranks_itself)

    def search_filtered(self, queries: np.ndarray, k: int, setting: Mapping, threads: int, row_filter: RowFilter,
                        query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each query's k best rows that `row_filter` allows it, at `setting` (as `method.filter_mode` says)."""
        return self.method.search_filtered(self.native, queries, k, setting, threads, row_filter, query_ids)

    def filter_plan(self, queries: np.ndarray, k: int, row_filter: RowFilter) -> str | None:
        return self.method.filter_plan(self.native, queries, k, row_filter) if self.method else None

    def run_metrics(self) -> dict[str, float]:
        return self.method.run_metrics(self.native) if self.method else {}

    def close(self) -> None:
        if self.method is not None:
            self.method.close(self.native)


FLOAT32 = np.dtype(np.float32)


def plain_rows(queries: np.ndarray) -> np.ndarray:
    """`queries` as a plain, writable, C-contiguous float32 array: nanobind bindings (Voyager) refuse a read-only
    memory map's rows. Checked by hand rather than by np.require, which costs ~10 µs per one-query call once the
    library's search has pushed numpy out of the CPU caches (1% of a 1 ms query)."""
    flags = queries.flags
    if type(queries) is np.ndarray and queries.dtype is FLOAT32 and flags.c_contiguous and flags.writeable:
        return queries
    return np.array(queries, dtype=np.float32, order="C")


def top_k_arrays(rows: list, values: list, k: int, to_scores: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-query results of varying length as (scores, ids) arrays of width k, padded with -inf and -1; `to_scores`
    turns the library's values (distances) into similarities, applied once to all of them when it can be.

    Each numpy call here runs after a search has pushed numpy out of the CPU caches, where one costs several µs:
    when every query found k (the usual case), two or three calls make the answer."""
    if all(len(ids) == k for ids in rows):
        stacked = np.asarray(values, dtype=np.float32).reshape(len(rows), k)
        return (to_scores(stacked) if to_scores else stacked), np.asarray(rows, dtype=np.int64).reshape(len(rows), k)
    out_scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (ids, found) in enumerate(zip(rows, values)):
        n = min(k, len(ids))
        found = np.asarray(found[:n], dtype=np.float32)
        out_ids[i, :n], out_scores[i, :n] = ids[:n], to_scores(found) if to_scores else found
    return out_scores, out_ids


def run_in_threads(search_one: Callable[[np.ndarray], Any], queries: np.ndarray, threads: int) -> list:
    """A library without a batch call: its call per query, on `threads` threads (such calls release the GIL)."""
    if threads <= 1 or len(queries) == 1:
        return [search_one(query) for query in queries]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(search_one, queries, chunksize=max(1, len(queries) // (threads * 8))))
