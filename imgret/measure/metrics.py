"""Metrics: small pure functions over result arrays. Recall is defined here and nowhere else."""
from __future__ import annotations

import numpy as np

from imgret.mapped import gather_rows
from imgret.measure.registry import (AS_PARAM, AT_10, CLIENTS, DATABASE, EVERY_RUN, FILTER, SERVER,
                                      VS_FP32, logged_when)

# The metrics' names by when a run logs them (each declared once, in imgret/measure/registry.py).
# Figures at depth 10 come from the timed search: a run searched at k < 10 has none of them (not a deeper, untimed
# search's, which its timings would not describe).
AT_10_METRICS = logged_when(AT_10)
RUN_METRICS = logged_when(EVERY_RUN, AT_10)
DATABASE_METRICS = logged_when(DATABASE, SERVER)
FILTER_METRICS = logged_when(FILTER)
CLIENTS_METRICS = logged_when(CLIENTS)
(VS_FP32_METRIC,) = logged_when(VS_FP32)
# What was searched: part of a run's result dict, but logged as MLflow params (they describe the run; as metrics
# they crowded recall and QPS out of MLflow's charts).
RUN_SIZES = logged_when(AS_PARAM)


def neighbours_that_exist(exact_ids: np.ndarray, k: int) -> np.ndarray:
    """Per query, how many exact neighbours its top-k has: k, or fewer where a filter allows fewer rows (the exact
    truth is padded with -1 past them)."""
    return (exact_ids[:, :k] >= 0).sum(axis=1)


def _mean_over_answerable(hits: np.ndarray, exist: np.ndarray) -> float:
    """The mean of hits / exist over the queries that have an exact neighbour; NaN when none has one."""
    answerable = exist > 0
    if not answerable.any():
        return float("nan")
    return float((hits[answerable] / exist[answerable]).mean())


def recall_at(found_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """|found top-k ∩ exact top-k| / min(k, the exact neighbours that exist), averaged over the queries that have
    at least one: an id of -1 ('no result', or the truth's padding where a filter allows fewer than k rows) never
    matches, a query whose filter allows no row is left out (counted by `queries_without_neighbours`), and NaN
    when every query is. Each exact neighbour counts once, however often a method returned it."""
    found, exact = found_ids[:, :k], exact_ids[:, :k]
    hits = np.zeros(len(found), dtype=np.int64)
    for start in range(0, len(found), 4096):  # bounds the (rows, k, k) comparison's memory
        block = exact[start:start + 4096, :, None] == found[start:start + 4096, None, :]
        hits[start:start + 4096] = (block.any(axis=2) & (exact[start:start + 4096] >= 0)).sum(axis=1)
    return _mean_over_answerable(hits, neighbours_that_exist(exact, k))


def queries_without_neighbours(exact_ids: np.ndarray) -> int:
    """How many queries have no exact neighbour at all (a filter that allows them no row): recall leaves them out."""
    return int((exact_ids[:, 0] < 0).sum()) if exact_ids.size else 0


def precision_at(found_ids: np.ndarray, gallery_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Share of the top-k results whose class is the query's class; NaN when the queries have no labels (-1)."""
    if np.all(query_labels < 0):
        return float("nan")
    found = found_ids[:, :k]
    labels = np.where(found >= 0, gallery_labels[np.clip(found, 0, None)], -1)
    return float((labels == query_labels[:, None]).mean())


def map_at(found_ids: np.ndarray, gallery_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Class-based mean average precision at k, the usual image-retrieval quality figure: per query,
    AP@k = sum over ranks i <= k of precision@i at each relevant result, divided by min(R, k), where R is the
    number of gallery items of the query's class (so a query whose k results are all of its class scores 1); the
    mean over queries. NaN when the queries have no labels (-1)."""
    if np.all(query_labels < 0):
        return float("nan")
    found = found_ids[:, :k]
    labels = np.where(found >= 0, gallery_labels[np.clip(found, 0, None)], -1)
    relevant = labels == query_labels[:, None]
    precision_at_rank = np.cumsum(relevant, axis=1) / np.arange(1, found.shape[1] + 1)
    per_class = np.bincount(gallery_labels[gallery_labels >= 0], minlength=int(query_labels.max()) + 1)
    denominators = np.minimum(per_class[np.clip(query_labels, 0, None)] * (query_labels >= 0), k)
    ap = np.divide((precision_at_rank * relevant).sum(axis=1), denominators,
                   out=np.zeros(len(found), dtype=np.float64), where=denominators > 0)
    return float(ap.mean())


def latency_percentiles(latencies_ms: np.ndarray, percentiles=(50, 95, 99)) -> dict[int, float]:
    values = np.percentile(np.asarray(latencies_ms, dtype=np.float64), percentiles)
    return {p: float(v) for p, v in zip(percentiles, values)}


def recall_at_ties(found_similarities: np.ndarray, exact_similarities: np.ndarray, k: int,
                   epsilon: float = 1e-6) -> float:
    """Tie-aware recall (ann-benchmarks' definition): a result counts if its true similarity is at least the
    similarity of the last exact neighbour minus `epsilon`, so swapping equally good neighbours is not a miss; per
    query at most min(k, the exact neighbours that exist) results count, over that number, averaged over the queries
    that have one (NaN when none has), as `recall_at`.

    `found_similarities` must be the true similarities of the found ids (see `similarities_of`), not an
    approximate index's own scores; -inf marks a missing result (and a row the filter does not allow), which never
    counts; -inf in `exact_similarities` marks the truth's padding past the rows a filter allows.
    """
    exact = exact_similarities[:, :k]
    exist = np.isfinite(exact).sum(axis=1)
    last = np.take_along_axis(exact, np.maximum(exist - 1, 0)[:, None], axis=1)
    found = found_similarities[:, :k]
    hits = (np.isfinite(found) & (found >= last - epsilon)).sum(axis=1)
    return _mean_over_answerable(np.minimum(hits, exist), exist)


def similarities_of(ids: np.ndarray, gallery: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The exact inner product of each query with each of its found gallery ids; -inf where id is -1."""
    out = np.full(ids.shape, -np.inf, dtype=np.float32)
    for start in range(0, len(ids), 256):  # bounds the (rows, k, dim) gather's memory
        block = ids[start:start + 256]
        valid = block >= 0
        vectors = gather_rows(gallery, np.where(valid, block, 0).ravel()).reshape(*block.shape, -1)
        sims = np.einsum("qkd,qd->qk", vectors, queries[start:start + 256])
        out[start:start + 256] = np.where(valid, sims, -np.inf)
    return out


# What a finished run prints: the figures people compare, in the order they read them.
RESULT_ROWS = (
    ("recall@1 / @10 / @k", ("recall_at_1", "recall_at_10", "recall_at_k"), "{:.4f}"),
    ("precision@10 / mAP@10", ("precision_at_10", "map_at_10"), "{:.4f}"),
    ("search p50 / p99 (ms)", ("search_ms_p50", "search_ms_p99"), "{:.3f}"),
    ("batch search (queries/s)", ("search_qps_batch",), "{:,.0f}"),
    ("extraction (images/s)", ("extract_images_per_s",), "{:,.1f}"),
    ("extraction: kernel share of its CPU time", ("extract_kernel_share",), "{:.2f}"),
    ("extraction: minor page faults per image", ("extract_minor_faults_per_image",), "{:,.0f}"),
    ("index build (s) / size (MB)", ("build_s", "index_bytes"), None),
    ("US$ per million queries / build (cost.*)", ("usd_per_million_queries", "build_usd"), "{:.4g}"),
    ("stages: stores / truth / index / search (s)", ("stores_s", "groundtruth_s", "index_s", "search_s"), "{:.2f}"),
    ("peak resident set (GB)", ("peak_rss_bytes",), None),
)


def results_table(metrics: dict[str, float]) -> str:
    """A small aligned table of a run's main figures (every metric is in MLflow and results.json)."""
    def shown(key: str, form: str | None) -> str:
        value = metrics.get(key, float("nan"))
        if key == "index_bytes":
            return f"{value / 1e6:,.1f}"
        if key == "peak_rss_bytes":
            return f"{value / 1e9:.2f}"
        return (form or "{:.2f}").format(value)

    rows = [(label, " / ".join(shown(key, form) for key in keys)) for label, keys, form in RESULT_ROWS
            if any(key in metrics for key in keys)]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)
