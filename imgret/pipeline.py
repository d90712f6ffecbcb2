"""One experiment run, stage by stage: images -> embedding store -> index -> search -> metrics.

Tracking is not done here: `run_experiment` returns plain results and the caller records them.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import faiss
import numpy as np
import threadpoolctl
import torch

from imgret.sources.base import Splits
from imgret.errors import ConfigError, DataUnavailable
from imgret.api import open_index, open_stores
from imgret.embed.extract import resolve_device
from imgret.index.groundtruth import exact_ground_truth
from imgret.measure.metrics import latency_percentiles, results_table, precision_at, recall_at, recall_at_ties, similarities_of
from imgret.measure.search import search_threads, timed_search
from imgret.measure.timing import PeakResidentSet, StageTimes

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict[str, float]
    info: dict = field(default_factory=dict)  # what was reused, where stores live: logged as tags
    texts: dict[str, str] = field(default_factory=dict)  # artifacts: name -> content


def configure_threads(threads: int | None) -> int:
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads!r} must be a positive whole number, or null for every core")
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        threadpoolctl.threadpool_limits(threads, user_api="blas")  # numpy's BLAS, used by brute force
    return torch.get_num_threads()


def run_experiment(cfg, splits: Splits | None,
                   watch_stores: Callable[[], ContextManager] = contextlib.nullcontext) -> RunResult:
    """Every stage after the images are listed (and the config checked against their number); `splits` is
    None for a vector source, whose stores are generated rather than extracted. `watch_stores` wraps the making
    of the stores (the tracker's system metrics)."""
    with PeakResidentSet() as memory:
        result = _run_stages(cfg, splits, memory, watch_stores)
    result.metrics["peak_rss_bytes"] = float(memory.peak_bytes)
    log.info("results (all metrics are in MLflow and results.json):\n%s", results_table(result.metrics))
    log.info("peak resident set by stage: %s", result.info["peak_rss_by_stage"])
    return result


def _run_stages(cfg, splits: Splits | None, memory: PeakResidentSet, watch_stores) -> RunResult:
    threads = configure_threads(cfg.get("threads"))
    stages = StageTimes(memory)
    with stages.measure("stores_s"), watch_stores():
        embeddings = open_stores(cfg, splits)
    gallery, queries = embeddings.gallery, embeddings.queries
    if len(gallery) < int(cfg.k) or len(queries) == 0:
        raise DataUnavailable(f"after leaving out {len(embeddings.bad_images)} unusable images, {len(gallery)} gallery "
                              f"and {len(queries)} query images remain: too few for k={cfg.k}")
    gallery_vectors = np.ascontiguousarray(gallery.vectors)
    query_vectors = np.ascontiguousarray(queries.vectors)

    # Every figure below comes from the timed search: recall@10 and precision@10 only when it is 10 deep.
    depth = min(max(int(cfg.k), 10), len(gallery))  # the cached ground truth's depth (shared by every k up to 10)
    with stages.measure("groundtruth_s"):
        truth = exact_ground_truth(gallery, queries, depth, Path(cfg.paths.cache))
    with stages.measure("index_s"):
        built = open_index(cfg.method, gallery, Path(cfg.paths.cache), resolve_device(cfg.device))
    with stages.measure("search_s"), search_threads(cfg.search.get("threads")), memory.paused():
        found = timed_search(built.index, query_vectors, int(cfg.k), int(cfg.search.latency_queries),
                             int(cfg.search.warmup_queries), int(cfg.search.get("repeats", 3)), int(cfg.seed),
                             progress=bool(cfg.extract.progress))

    latency = latency_percentiles(found.latencies_ms)
    found_similarities = similarities_of(found.ids, gallery_vectors, query_vectors)
    epsilon = float(cfg.search.tie_epsilon)
    batch_qps = [len(query_vectors) / seconds for seconds in found.batch_seconds]
    at_10 = {}
    if int(cfg.k) >= 10:
        at_10 = {"recall_at_10": recall_at(found.ids, truth.ids, 10),
                 "recall_at_10_ties": recall_at_ties(found_similarities, truth.scores, 10, epsilon),
                 "precision_at_10": precision_at(found.ids, gallery.labels, queries.labels, 10)}
    metrics = {
        "recall_at_1": recall_at(found.ids, truth.ids, 1),
        **at_10,
        "recall_at_k": recall_at(found.ids, truth.ids, int(cfg.k)),
        "recall_at_k_ties": recall_at_ties(found_similarities, truth.scores, int(cfg.k), epsilon),
        "search_ms_p50": latency[50],
        "search_ms_p95": latency[95],
        "search_ms_p99": latency[99],
        "search_qps_batch": max(batch_qps),  # the best of search.repeats calls; all of them in a tag
        "build_s": built.build_s,
        "index_bytes": float(built.nbytes),
        **embeddings.timings,
        "gallery_size": float(len(gallery)),
        "query_size": float(len(queries)),
        "dim": float(gallery.dim),
        "bad_images": float(len(embeddings.bad_images)),
        **stages,
    }
    info = {
        "embeddings_extracted": ",".join(embeddings.extracted) or "none",
        "gallery_store": str(gallery.path),
        "query_store": str(queries.path),
        "index_built": str(not built.reused).lower(),
        "index_path": str(built.path) if built.path else "none",
        "threads": str(threads),
        "search_threads": str(cfg.search.get("threads") or threads),
        "latency_queries": str(len(found.latencies_ms)),
        "batch_qps_repeats": ", ".join(f"{qps:.1f}" for qps in batch_qps),
        "peak_rss_by_stage": stages.describe_peaks(),
        **embeddings.checks,
    }
    texts = {"bad_images.txt": "".join(f"{line}\n" for line in embeddings.bad_images)} if embeddings.bad_images else {}
    return RunResult(metrics, info, texts)
