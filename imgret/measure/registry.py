"""Every metric imgret logs, declared once: its name, what it is, its unit, which way is better and when a run logs
it. The pipeline's runs and the sweep's parent are checked against it when they log (an undeclared name is a bug),
the report and `objectives` read it, and docs/reference/metrics.md's table is generated from it
(`python -m imgret.measure.registry`; tests/test_docs.py fails when the page is stale).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# When a metric is logged (the registry's `logged`): every run, or only where its condition holds.
EVERY_RUN = "every run"
AT_10 = "every run at k ≥ 10"
AS_PARAM = "every run, as an MLflow param"
VS_FP32 = "at another precision or backend than PyTorch eager fp32, fp32's stores of the same images cached"
DATABASE = "a vector database"
SERVER = "a database server"
CLIENTS = "with `search.clients` (N: each client count)"
FILTER = "with a filter"
SWEEP = "a sweep's parent run (`/<model>` beside each: the same over that model's points)"


@dataclass(frozen=True)
class Metric:
    name: str  # as logged; a capital N stands for a number (qps_clients_N: qps_clients_1, qps_clients_2, ...)
    meaning: str  # Markdown, for the metrics page
    unit: str
    better: str  # "higher", "lower", or "" where neither is (a size, a count of what was searched)
    logged: str  # when (one of the constants above)

    def matches(self, key: str) -> bool:
        if "N" not in self.name:
            return key == self.name
        return re.fullmatch(re.escape(self.name).replace("N", r"\d+"), key) is not None


def _declare(names: tuple[str, ...], meaning: str, unit: str, better: str, logged: str | tuple[str, ...]
             ) -> list[Metric]:
    """Metrics that share a meaning (one row of the page); `logged` per name where they differ."""
    whens = logged if isinstance(logged, tuple) else (logged,) * len(names)
    return [Metric(name, meaning, unit, better, when) for name, when in zip(names, whens, strict=True)]


_RECALL = ("\\|found top-k ∩ exact top-k\\| / min(k, the exact neighbours that exist), the mean over queries, against "
           "the exact ground truth (computed once per pair of embedding stores and cached); `recall_at_10` only when "
           "k ≥ 10. Without a filter every query has k exact neighbours; a filter that allows a query fewer than k rows "
           "leaves it fewer, and a query it allows no row is left out of the mean (counted in "
           "`queries_without_neighbours`). \"No result\" (-1) never matches, and an exact neighbour returned twice "
           "counts once")

METRICS: tuple[Metric, ...] = tuple([
    *_declare(("recall_at_1", "recall_at_10", "recall_at_k"), _RECALL, "share of 1", "higher",
              (EVERY_RUN, AT_10, EVERY_RUN)),
    *_declare(("recall_at_10_ties", "recall_at_k_ties"),
              "tie-aware recall: a result counts when its true similarity is at least the last exact neighbour's minus "
              "`search.tie_epsilon` (at most min(k, the neighbours that exist) count), over the same number, the mean "
              "over the same queries", "share of 1", "higher", (AT_10, EVERY_RUN)),
    *_declare(("precision_at_10",), "the share of the top 10 results with the query's class (NaN for vectors without "
              "labels; only when k ≥ 10)", "share of 1", "higher", AT_10),
    *_declare(("map_at_10",), "class-based mean average precision at 10: per query, the precision at each rank that "
              "holds an image of the query's class, summed over the top 10 and divided by min(images of that class in "
              "the gallery, 10); the mean over queries (NaN without labels; only when k ≥ 10)", "share of 1", "higher",
              AT_10),
    *_declare(("search_ms_p50", "search_ms_p95", "search_ms_p99"),
              "single-query latency at k, one call per query, `search.latency_queries` (1,000) calls over a random "
              "sample of queries (fixed by `seed`) disjoint from the `search.warmup_queries` (50) that warm the index "
              "up", "ms", "lower", EVERY_RUN),
    *_declare(("search_qps_batch",), "queries per second with all queries in one call at k: the best of "
              "`search.repeats` (3) calls; every repeat is in the tag `batch_qps_repeats`", "queries/s", "higher",
              EVERY_RUN),
    *_declare(("build_s",), "index build time (train + add); a cached index reports it as it was built", "s", "lower",
              EVERY_RUN),
    *_declare(("index_bytes",), "the index's serialised size", "bytes", "lower", EVERY_RUN),
    *_declare(("extract_ms_per_image",), "median model-forward time at batch size 1 (preprocessing excluded), the "
              "seed's measure", "ms", "lower", EVERY_RUN),
    *_declare(("extract_images_per_s",), "end-to-end extraction throughput at `batch_size`, data loading included",
              "images/s", "higher", EVERY_RUN),
    *_declare(("extract_kernel_share",), "of the extraction's CPU time (its process and its data-loader workers), the "
              "kernel's share, sys / (user + sys)", "share of 1", "lower", EVERY_RUN),
    *_declare(("extract_minor_faults_per_image",), "the extraction's minor page faults per image extracted",
              "faults", "lower", EVERY_RUN),
    *_declare(("bad_images",), "images left out because they could not be read (listed in the artifact "
              "`bad_images.txt`)", "images", "lower", EVERY_RUN),
    *_declare(("stores_s", "groundtruth_s", "index_s", "search_s"), "where the run's time went: embedding stores "
              "extracted, written or opened; exact ground truth computed or loaded; index built or loaded; timed "
              "search", "s", "lower", EVERY_RUN),
    *_declare(("peak_rss_bytes",), "the largest resident set of the process while the run worked (sampled every 50 ms "
              "by a thread that stops during the timed search, sampled just before and after it; in a sweep it "
              "includes what earlier jobs left in the process)", "bytes", "lower", EVERY_RUN),
    *_declare(("gallery_size", "query_size", "dim"), "what was searched: in the run's result, logged as MLflow params "
              "(not metrics, so recall and QPS lead the charts)", "rows, dimensions", "", AS_PARAM),
    *_declare(("recall_at_10_vs_fp32",), "recall@10 against the exact neighbours of the fp32 rows (what the cheaper "
              "rows cost in retrieval)", "share of 1", "higher", VS_FP32),
    *_declare(("ingest_s", "index_create_s"), "the gallery's rows loaded into the database (COPY, inserts, the "
              "client's add) and, apart, its index created over them; both from when the database was made (a "
              "database reused from the cache reports them as recorded). `build_s` is the whole build, both included",
              "s", "lower", DATABASE),
    *_declare(("db_disk_bytes",), "the database's files on disk, as the run opened them (`index_bytes` is the packed "
              "copy the index cache keeps)", "bytes", "lower", DATABASE),
    *_declare(("server_peak_rss_bytes",), "the largest sum of resident sets over the server's process tree, sampled "
              "every 0.25 s from its start to the run's end (shared memory counted in each process: an upper bound); "
              "an embedded database's memory is in `peak_rss_bytes`", "bytes", "lower", SERVER),
    *_declare(("qps_clients_N", "search_ms_p99_clients_N"), "N client threads of the run's process, each sending one "
              "query at a time for `search.clients_s` seconds (each on its own connection to a database), at the "
              "run's query setting; the queries answered per second and their p99 latency", "queries/s, ms",
              "higher, lower", CLIENTS),
    *_declare(("usd_per_million_queries", "usd_per_million_queries_clients_N"),
              "what a million queries cost at the `cost` group's prices: the hourly price of the cores searching "
              "(`search.threads`; under N clients, N x `search.threads`, at most the machine's cores), of the index in "
              "memory (`index_bytes`) and of a database's files on disk (`db_disk_bytes`), divided by the throughput: "
              "one client one query at a time (1000 / `search_ms_p50` queries a second), or `qps_clients_N`", "US$",
              "lower", (EVERY_RUN, CLIENTS)),
    *_declare(("build_usd",), "what the index's build cost at the `cost` group's price of a core-hour: `build_s` on "
              "the run's `threads` cores (an engine that sizes its own thread pools may have used more)", "US$",
              "lower", EVERY_RUN),
    *_declare(("filter_selectivity",), "the share of the gallery a query may return, as realised on this gallery, the "
              "mean over the queries (an attribute filter's nominal `filter.selectivity` keeps a little more or less "
              "on a finite gallery)", "share of 1", "", FILTER),
    *_declare(("queries_without_neighbours",), "the queries whose filter allows no gallery row at all; recall has "
              "nothing to measure for them and leaves them out (every recall is NaN when no query has a neighbour)",
              "queries", "", FILTER),
    *_declare(("best_qps_recallN",), "the most queries per second (batch) of the sweep's points reaching recall@10 of "
              "N/100 (0.90, 0.95 and 0.99)", "queries/s", "higher", SWEEP),
    *_declare(("best_recall_at_10",), "the highest recall@10 of the sweep's points", "share of 1", "higher", SWEEP),
])

BY_NAME = {metric.name: metric for metric in METRICS}


def declared(key: str) -> Metric | None:
    """The declaration a logged key answers to (`qps_clients_2` -> qps_clients_N; `best_recall_at_10/resnet18` ->
    best_recall_at_10); None for an undeclared key."""
    key = key.split("/", 1)[0]
    return BY_NAME.get(key) or next((metric for metric in METRICS if metric.matches(key)), None)


def undeclared(keys) -> list[str]:
    """The keys no declaration answers to (MLflow's own system/ metrics are not imgret's)."""
    return [key for key in keys if not key.startswith("system/") and declared(key) is None]


def logged_when(*whens: str) -> tuple[str, ...]:
    return tuple(metric.name for metric in METRICS if metric.logged in whens)


def reference_table() -> str:
    """docs/reference/metrics.md's table: a row per meaning, its metrics, unit, which way is better and when."""
    rows, seen = [], []
    for metric in METRICS:
        if metric.meaning in seen:
            continue
        seen.append(metric.meaning)
        group = [m for m in METRICS if m.meaning == metric.meaning]
        whens = {m.logged for m in group}
        when = metric.logged if len(whens) == 1 else "; ".join(f"`{m.name}`: {m.logged}" for m in group)
        rows.append(f"| {', '.join(f'`{m.name}`' for m in group)} | {metric.meaning} | {metric.unit} | "
                    f"{metric.better or '–'} | {when} |")
    return "\n".join(["| metric | meaning | unit | better | logged |", "| --- | --- | --- | --- | --- |", *rows]) + "\n"


if __name__ == "__main__":
    print(reference_table(), end="")
