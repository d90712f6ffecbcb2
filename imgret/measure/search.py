"""The search timing protocol, for runs and the benchmark alike.

- Batch throughput: all queries in one call, repeated; the best repeat is the figure (the least disturbed by
  other work on the machine), and every repeat is kept so the spread can be reported.
- Single-query latency: a random sample of queries, disjoint from the queries that warm the index up, each
  searched alone (cycling through the sample when it is smaller than the number of calls wanted).
- Both are timed at the k asked for; a deeper search for metrics at depth 10 is the caller's, untimed.
- Threads: `search_threads(n)` fixes torch's, faiss's and BLAS's threads around a search; n=1 is
  ann-benchmarks' single-thread protocol.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from imgret.errors import bad_value, check_whole, number, whole
from imgret.index.base import SearchIndex
from imgret.options import config_defaults

_RUN, _SEARCH = config_defaults(), config_defaults().search


@dataclass(frozen=True)
class SearchSettings:
    """How a run searches and times: at k, with these sample sizes, threads and tie tolerance. The defaults are
    conf/config.yaml's, read from it."""
    k: int = _RUN.k
    latency_queries: int = _SEARCH.latency_queries
    warmup_queries: int = _SEARCH.warmup_queries
    repeats: int = _SEARCH.repeats
    threads: int | None = _SEARCH.threads
    tie_epsilon: float = _SEARCH.tie_epsilon
    seed: int = _RUN.seed  # which queries are timed one at a time
    progress: bool = _RUN.extract.progress
    clients: tuple[int, ...] = ()  # client counts whose throughput is measured (search.clients)
    clients_s: float = _SEARCH.clients_s

    @staticmethod
    def check_section(search) -> None:
        """The `search` group's keys, as written (before any conversion): each bad one refused in one line."""
        if not number(search.get("tie_epsilon")) or search.tie_epsilon < 0:
            raise bad_value("search.tie_epsilon", search.get("tie_epsilon"), "a similarity tolerance >= 0, such as 1e-6")
        check_whole("search.latency_queries", search.get("latency_queries"), 1, " of single-query calls")
        check_whole("search.warmup_queries", search.get("warmup_queries"), 0, " of untimed calls")
        check_whole("search.repeats", search.get("repeats", 3), 1, " of batch calls (the best is reported)")
        if search.get("threads") is not None:
            check_whole("search.threads", search.threads, 1, " of search threads, or null for `threads`")
        clients = search.get("clients")
        for count in ([] if clients is None else [clients] if isinstance(clients, int) else clients):
            if not whole(count, 1, 64):
                raise bad_value("search.clients", clients, "null, or client counts from 1 to 64 such as [1,2,4]")
        if not number(search.get("clients_s")) or not 0 < search.clients_s <= 600:
            raise bad_value("search.clients_s", search.get("clients_s"),
                            "seconds per client count, more than 0, at most 600")

    @classmethod
    def from_config(cls, cfg) -> "SearchSettings":
        search = cfg.search
        return cls(k=int(cfg.k), latency_queries=int(search.latency_queries), warmup_queries=int(search.warmup_queries),
                   repeats=int(search.get("repeats", 3)), threads=search.get("threads"),
                   tie_epsilon=float(search.tie_epsilon), seed=int(cfg.seed), progress=bool(cfg.extract.progress),
                   clients=client_counts(search.get("clients")), clients_s=float(search.get("clients_s", 5)))


def client_counts(clients) -> tuple[int, ...]:
    """search.clients as a tuple of counts: null, one count, or a list of them."""
    if clients is None:
        return ()
    return (int(clients),) if isinstance(clients, int) else tuple(int(count) for count in clients)


@dataclass(frozen=True)
class SearchRun:
    ids: np.ndarray  # (queries, k), from the last batch call
    scores: np.ndarray
    batch_seconds: tuple[float, ...]  # every repeat of the batch call
    latencies_ms: np.ndarray  # one per single-query call
    latency_sample: np.ndarray  # the queries timed one at a time (none of them warmed up)

    @property
    def best_batch_seconds(self) -> float:
        return min(self.batch_seconds)


def latency_sample(query_count: int, latency_queries: int, warmup_queries: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(warm-up queries, timed queries): a random split, disjoint whenever there are two queries or more."""
    order = np.random.default_rng(seed).permutation(query_count)
    warmup = order[:min(warmup_queries, max(query_count - 1, 0))]
    timed = order[len(warmup):]
    return warmup, timed[np.arange(max(latency_queries, 1)) % len(timed)]


def timed_search(index: SearchIndex, queries: np.ndarray, k: int, latency_queries: int = 1000,
                 warmup_queries: int = 50, repeats: int = 3, seed: int = 0, progress: bool = True) -> SearchRun:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    warmup, sample = latency_sample(len(queries), latency_queries, warmup_queries, seed)
    index.search(queries[:min(len(queries), 8)], k)  # first call pays for allocations and thread start-up
    batch_seconds = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        scores, ids = index.search(queries, k)
        batch_seconds.append(time.perf_counter() - start)

    for i in warmup:
        index.search(queries[i:i + 1], k)
    latencies = np.empty(len(sample), dtype=np.float64)
    for n, i in enumerate(tqdm(sample, desc="single-query latency", unit="query", disable=not progress,
                               mininterval=2)):
        one = queries[i:i + 1]
        start = time.perf_counter()
        index.search(one, k)
        latencies[n] = (time.perf_counter() - start) * 1000
    return SearchRun(ids=ids, scores=scores, batch_seconds=tuple(batch_seconds), latencies_ms=latencies,
                     latency_sample=sample)


@dataclass(frozen=True)
class ClientsRun:
    clients: int
    queries: int  # answered within the time
    seconds: float  # from the first call to the last answer
    latencies_ms: np.ndarray

    @property
    def qps(self) -> float:
        return self.queries / self.seconds


def concurrent_clients(index: SearchIndex, queries: np.ndarray, k: int, clients: int, seconds: float,
                       seed: int = 0) -> ClientsRun:
    """`clients` threads, each sending one query at a time (its own random order of the queries) until `seconds`
    have passed: how many were answered, and each one's latency. Libraries search the shared index from each
    thread (their searches release the GIL); a database gives each thread its own connection."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start_line = threading.Barrier(clients + 1)

    errors: list[BaseException] = []
    stop = threading.Event()  # set when the caller is interrupted: the clients end at their next query

    def client(number: int) -> None:
        try:
            order = np.random.default_rng((seed, number)).permutation(len(queries))
            mine = latencies[number]
            index.search(queries[order[0]:order[0] + 1], k)  # its connection opened, untimed
            start_line.wait()
            deadline = time.perf_counter() + seconds
            position = 0
            while (began := time.perf_counter()) < deadline and not stop.is_set():
                i = order[position % len(order)]
                index.search(queries[i:i + 1], k)
                mine.append((time.perf_counter() - began) * 1000)
                position += 1
        except BaseException as error:  # raised in the calling thread once every client has ended
            errors.append(error)
            start_line.abort()

    threads = [threading.Thread(target=client, args=(number,), name=f"client-{number}", daemon=True)
               for number in range(clients)]
    for thread in threads:
        thread.start()
    try:
        with contextlib.suppress(threading.BrokenBarrierError):
            start_line.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
    finally:
        stop.set()
        start_line.abort()
    real = [error for error in errors if not isinstance(error, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    every = np.array([value for mine in latencies for value in mine], dtype=np.float64)
    return ClientsRun(clients, len(every), elapsed, every)


@contextlib.contextmanager
def search_threads(threads: int | None):
    """torch, faiss and BLAS on `threads` threads while searching (None: leave them as they are)."""
    if threads is None:
        yield
        return
    import faiss
    import threadpoolctl
    import torch

    before = (torch.get_num_threads(), faiss.omp_get_max_threads())
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:
        with threadpoolctl.threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
