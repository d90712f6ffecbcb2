"""One experiment run, stage by stage: images -> embedding store -> index -> search -> metrics.

Tracking is not done here: `run_experiment` returns plain results and the caller records them.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager

import faiss
import numpy as np
import threadpoolctl
import torch

from imgret.sources.base import ImagesToEmbed, ReadyVectors, SourceSettings, Splits
from imgret.sources.registry import settings_of
from imgret.errors import ConfigError, DataUnavailable
from imgret.api import open_index, open_stores
from imgret.embed.options import ExtractSettings
from imgret.options import config_defaults
from imgret.embed.extract import fp32_reference_stores
from imgret.embed.backend_choice import choose_backend
from imgret.embed.resolve import precision_choice, resolve_device
from imgret.index.groundtruth import exact_filtered_ground_truth, exact_ground_truth
from imgret.index.filtered import FilteredSearch
from imgret.index.filters import FilterSettings, RowFilter
from imgret.index.methods import MethodSettings
from imgret.measure.metrics import (VS_FP32_METRIC, latency_percentiles, map_at, precision_at,
                                    queries_without_neighbours, recall_at, recall_at_ties, results_table,
                                    similarities_of)
from imgret.index.base import BuiltIndex, SearchIndex
from imgret.measure.search import (ClientsRun, SearchRun, SearchSettings, concurrent_clients, search_threads,
                                   timed_search)
from imgret.measure.cost import Prices, cost_metrics
from imgret.measure.timing import PeakResidentSet, StageTimes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """Everything one run's stages read, typed and frozen: the data source's and the method's own settings, the
    extraction's, the search's, and the compute threads. An entry point makes it once (`from_config`); a library
    user can make it by hand, without Hydra."""
    data: SourceSettings
    method: MethodSettings
    extract: ExtractSettings
    search: SearchSettings = field(default_factory=SearchSettings)
    threads: int | None = config_defaults().threads
    filter: FilterSettings = field(default_factory=FilterSettings)
    cost: Prices = field(default_factory=Prices)

    def __post_init__(self) -> None:  # a library caller's data and method sections become typed here, once
        object.__setattr__(self, "data", settings_of(self.data))
        object.__setattr__(self, "method", MethodSettings.of(self.method))

    @classmethod
    def from_config(cls, cfg) -> "RunSettings":
        return cls(settings_of(cfg.data), MethodSettings.of(cfg.method), ExtractSettings.from_config(cfg),
                   SearchSettings.from_config(cfg), cfg.get("threads"), FilterSettings.of(cfg.get("filter")),
                   Prices.from_config(cfg))


@dataclass
class RunResult:
    metrics: dict[str, float]
    info: dict = field(default_factory=dict)  # what was reused, where stores live: logged as tags
    texts: dict[str, str] = field(default_factory=dict)  # artifacts: name -> content
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # artifacts saved as <name>.npy: what the search found


def configure_threads(threads: int | None) -> int:
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads!r} must be a positive whole number, or null for every core")
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        threadpoolctl.threadpool_limits(threads, user_api="blas")  # numpy's BLAS, used by brute force
    return torch.get_num_threads()


def run_experiment(settings: RunSettings, provided: ImagesToEmbed | ReadyVectors,
                   watch_stores: Callable[[], ContextManager] = contextlib.nullcontext) -> RunResult:
    """Every stage after the source said what it provides (images listed, or vectors planned) and the config was
    checked against its size. `watch_stores` wraps the making of the stores (the tracker's system metrics)."""
    with PeakResidentSet() as memory:
        result = _run_stages(settings, provided, memory, watch_stores)
    result.metrics["peak_rss_bytes"] = float(memory.peak_bytes)
    log.info("results (all metrics are in MLflow and results.json):\n%s", results_table(result.metrics))
    log.info("peak resident set by stage: %s", result.info["peak_rss_by_stage"])
    return result


def against_fp32_rows(settings: RunSettings, splits: Splits, embeddings, found_ids: np.ndarray,
                      depth: int) -> dict[str, float]:
    """recall@10 against the exact neighbours of PyTorch eager fp32's rows of the same images (its stores cached,
    e.g. made first by the same sweep): what a cheaper precision or another backend costs in retrieval."""
    reference = fp32_reference_stores(settings.extract, splits)
    if reference is None:
        return {}
    if reference.gallery.paths != embeddings.gallery.paths or reference.queries.paths != embeddings.queries.paths:
        log.warning("the fp32 stores hold other images (unusable ones left out differently): no recall@10 vs fp32")
        return {}
    truth = exact_ground_truth(reference.gallery, reference.queries, depth, settings.extract.cache_dir)
    return {VS_FP32_METRIC: recall_at(found_ids, truth.ids, 10)}


def clients_metrics(run: ClientsRun) -> dict[str, float]:
    return {f"qps_clients_{run.clients}": run.qps,
            f"search_ms_p99_clients_{run.clients}": float(np.percentile(run.latencies_ms, 99))}


def _search_stage(built: BuiltIndex, search: SearchSettings, query_vectors: np.ndarray, stages: StageTimes,
                  memory: PeakResidentSet, target: SearchIndex) -> tuple[SearchRun, list[ClientsRun], dict[str, float]]:
    """The timed search of `target` (the index, or the index under a filter), then the concurrent clients, and what
    the index adds (a database's ingest time, its server's memory); the index closed after, however it ends (a
    database's server stopped)."""
    k = search.k
    try:
        with stages.measure("search_s"), search_threads(search.threads), memory.paused():
            found = timed_search(target, query_vectors, k, search.latency_queries, search.warmup_queries,
                                 search.repeats, search.seed, progress=search.progress)
            under_load = [concurrent_clients(target, query_vectors, k, count, search.clients_s, search.seed)
                          for count in search.clients]
        return found, under_load, built.run_metrics()
    finally:
        built.close()


def true_similarities(found_ids: np.ndarray, gallery_vectors: np.ndarray, query_vectors: np.ndarray,
                      row_filter: RowFilter | None) -> np.ndarray:
    """Each found id's exact similarity to its query (what tie-aware recall reads); -inf for no result and for a row
    the filter does not allow, which is no answer."""
    found_similarities = similarities_of(found_ids, gallery_vectors, query_vectors)
    if row_filter is not None:
        found_similarities[~row_filter.allows(np.arange(len(found_ids))[:, None], found_ids)] = -np.inf
    return found_similarities


def found_arrays(found: SearchRun, truth, found_similarities: np.ndarray) -> dict[str, np.ndarray]:
    """What the run found and what it was measured against, kept with the run so that every recall can be
    recomputed from its outputs alone (docs/reference/metrics.md says how): ids as int32 where they fit."""
    def compact(ids: np.ndarray) -> np.ndarray:
        return ids.astype(np.int32) if ids.size == 0 or ids.max() < 2**31 else ids

    return {"found_ids": compact(found.ids), "found_scores": found.scores.astype(np.float32),
            "found_similarities": found_similarities, "exact_ids": compact(truth.ids), "exact_scores": truth.scores}


def _accuracy(found_ids: np.ndarray, found_similarities: np.ndarray, truth, embeddings, row_filter: RowFilter | None,
              k: int, epsilon: float) -> dict[str, float]:
    """Recall against the exact (filtered) neighbours, by ids and tie-aware, and the class-based precision; at 10
    only when the search was 10 deep."""
    gallery, queries = embeddings.gallery, embeddings.queries
    at_10 = {} if k < 10 else {
        "recall_at_10": recall_at(found_ids, truth.ids, 10),
        "recall_at_10_ties": recall_at_ties(found_similarities, truth.scores, 10, epsilon),
        "precision_at_10": precision_at(found_ids, gallery.labels, queries.labels, 10),
        "map_at_10": map_at(found_ids, gallery.labels, queries.labels, 10)}
    filtered = {} if row_filter is None else {"filter_selectivity": row_filter.selectivity,
                                              "queries_without_neighbours": float(queries_without_neighbours(truth.ids))}
    return {"recall_at_1": recall_at(found_ids, truth.ids, 1), **at_10,
            "recall_at_k": recall_at(found_ids, truth.ids, k),
            "recall_at_k_ties": recall_at_ties(found_similarities, truth.scores, k, epsilon), **filtered}


def _extraction_choice(settings: RunSettings, images: ImagesToEmbed | None):
    """(settings with the device, the precision and the backend resolved, once for the whole run, the precision
    choice, the backend choice), each choice logged with why; ready vectors have no model to choose for."""
    extract = replace(settings.extract, device=resolve_device(settings.extract.device))
    if images is None:
        return replace(settings, extract=extract), None, None
    precision = precision_choice(extract, extract.device)
    log.info("extraction precision %s: %s (CPU flags: %s)", precision.precision, precision.reason, precision.flags)
    extract = replace(extract, precision=precision.precision)
    backend = choose_backend(extract, images.splits.gallery)
    log.info("extraction backend %s: %s", backend.backend, backend.reason)
    return replace(settings, extract=replace(extract, backend=backend.backend)), precision, backend


def _search_metrics(found: SearchRun, queries: int, built: BuiltIndex, index_metrics: dict[str, float],
                    under_load: list[ClientsRun]) -> tuple[dict[str, float], list[float]]:
    """The timed search's latency and throughput, the index's cost and what it adds, the clients' throughput; and
    each batch call's queries per second."""
    latency = latency_percentiles(found.latencies_ms)
    batch_qps = [queries / seconds for seconds in found.batch_seconds]
    return {
        "search_ms_p50": latency[50],
        "search_ms_p95": latency[95],
        "search_ms_p99": latency[99],
        "search_qps_batch": max(batch_qps),  # the best of search.repeats calls; all of them in a tag
        "build_s": built.build_s,
        "index_bytes": float(built.nbytes),
        **index_metrics,
        **{name: value for run in under_load for name, value in clients_metrics(run).items()},
    }, batch_qps


def _store_metrics(embeddings) -> dict[str, float]:
    """What was searched, and the extraction's timings as the stores were made."""
    return {**embeddings.timings, "gallery_size": float(len(embeddings.gallery)),
            "query_size": float(len(embeddings.queries)), "dim": float(embeddings.gallery.dim),
            "bad_images": float(len(embeddings.bad_images))}


def _run_stages(settings: RunSettings, provided: ImagesToEmbed | ReadyVectors, memory: PeakResidentSet,
                watch_stores) -> RunResult:
    threads = configure_threads(settings.threads)
    search, cache_dir, k = settings.search, settings.extract.cache_dir, settings.search.k
    stages = StageTimes(memory)
    images = provided if isinstance(provided, ImagesToEmbed) else None  # ready vectors have no model
    settings, precision, backend = _extraction_choice(settings, images)
    with stages.measure("stores_s"), watch_stores():
        embeddings = open_stores(settings.extract, provided)
    gallery, queries = embeddings.gallery, embeddings.queries
    if len(gallery) < k or len(queries) == 0:
        raise DataUnavailable(f"after leaving out {len(embeddings.bad_images)} unusable images, {len(gallery)} gallery "
                              f"and {len(queries)} query images remain: too few for k={k}")
    gallery_vectors = np.ascontiguousarray(gallery.vectors)
    query_vectors = np.ascontiguousarray(queries.vectors)

    # Every figure below comes from the timed search: recall@10 and precision@10 only when it is 10 deep.
    depth = min(max(k, 10), len(gallery))  # the cached ground truth's depth (shared by every k up to 10)
    row_filter = settings.filter.rows_for(gallery.labels, queries.labels, search.seed)
    with stages.measure("groundtruth_s"):
        truth = exact_ground_truth(gallery, queries, depth, cache_dir) if row_filter is None else \
            exact_filtered_ground_truth(gallery, queries, depth, cache_dir, row_filter)
    with stages.measure("index_s"):
        built = open_index(settings.method, gallery, cache_dir, settings.extract.device)
    target = built.index if row_filter is None else \
        FilteredSearch(built, built.method.query_setting(settings.method), row_filter, query_vectors)
    found, under_load, index_metrics = _search_stage(built, search, query_vectors, stages, memory, target)

    found_similarities = true_similarities(found.ids, gallery_vectors, query_vectors, row_filter)
    accuracy = _accuracy(found.ids, found_similarities, truth, embeddings, row_filter, k, search.tie_epsilon)
    if images and row_filter is None and k >= 10:
        accuracy.update(against_fp32_rows(settings, images.splits, embeddings, found.ids, depth))
    searched, batch_qps = _search_metrics(found, len(query_vectors), built, index_metrics, under_load)
    searched.update(cost_metrics(settings.cost, searched, search.threads or threads, threads))
    metrics = {**accuracy, **searched, **_store_metrics(embeddings), **stages}
    info = {
        "embeddings_extracted": ",".join(embeddings.extracted) or "none",
        "gallery_store": str(gallery.path),
        "query_store": str(queries.path),
        "weights": gallery.meta["key"].get("encoder", {}).get("weights", "none (vectors, no model)"),
        **(precision.tags() if precision else {}),
        **(backend.tags() if backend else {}),
        "index_built": str(not built.reused).lower(),
        "filter": row_filter.describe() if row_filter else "none",
        "filter_mode": built.method.filter_mode if row_filter and built.method else "none",
        **({"filter_plan": plan} if row_filter and (plan := built.filter_plan(query_vectors, k, row_filter)) else {}),
        "index_path": str(built.path) if built.path else "none",
        "threads": str(threads),
        "search_threads": str(search.threads or threads),
        "latency_queries": str(len(found.latencies_ms)),
        "batch_qps_repeats": ", ".join(f"{qps:.1f}" for qps in batch_qps),
        "peak_rss_by_stage": stages.describe_peaks(),
        **embeddings.checks,
    }
    texts = {"bad_images.txt": "".join(f"{line}\n" for line in embeddings.bad_images)} if embeddings.bad_images else {}
    return RunResult(metrics, info, texts, found_arrays(found, truth, found_similarities))
