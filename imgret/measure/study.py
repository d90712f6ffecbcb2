"""Accuracy-vs-speed study: small pure functions over runs (dicts of params and metrics)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

EXACT_METHODS = ("brute", "flat")
RECALL_TARGETS = (0.90, 0.95, 0.99)


def pareto_frontier(recall: Sequence[float], speed: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points (no other point has both higher recall and higher speed),
    ordered from fastest to most accurate. For a cost such as latency, pass its negative as speed."""
    recall = np.asarray(recall, dtype=float)
    speed = np.asarray(speed, dtype=float)
    order = np.lexsort((-recall, -speed))  # fastest first; among equal speed, best recall first
    frontier, best_recall = [], -np.inf
    for i in order:
        if recall[i] > best_recall:
            frontier.append(int(i))
            best_recall = recall[i]
    return frontier


def fastest_reaching(runs: Sequence[dict], target: float, recall_key: str = "recall_at_10",
                     speed_key: str = "search_qps_batch") -> dict | None:
    """The run with the highest speed among those whose recall reaches `target`, or None."""
    reaching = [run for run in runs if run[recall_key] >= target - 1e-12]
    return max(reaching, key=lambda run: run[speed_key]) if reaching else None


def representative(runs: Sequence[dict], target: float = 0.95) -> dict:
    """One run to stand for a (model, method) cell: the fastest single query reaching `target` recall@10,
    else the most accurate."""
    reaching = [run for run in runs if run["recall_at_10"] >= target - 1e-12]
    if reaching:
        return min(reaching, key=lambda run: run["search_ms_p50"])
    return max(runs, key=lambda run: (run["recall_at_10"], -run["search_ms_p50"]))


# What the scaling study follows against gallery size: (metric, axis label).
SCALING_METRICS = (
    ("build_s", "index build, s"),
    ("search_qps_batch", "queries per second (batch)"),
    ("search_ms_p99", "p99 single-query latency, ms"),
    ("peak_rss_bytes", "peak resident set, GB"),
    ("recall_at_10", "recall@10"),
)


def growth_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """b in value ≈ a · size^b: the least-squares slope of log(value) on log(size). NaN with fewer than two
    distinct sizes or any value that is not positive (a log-log fit needs both)."""
    sizes, values = np.asarray(sizes, dtype=float), np.asarray(values, dtype=float)
    if len(np.unique(sizes)) < 2 or not np.all(values > 0) or not np.all(np.isfinite(values)):
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def summary_metrics(runs: Sequence[dict]) -> dict[str, float]:
    """What a sweep's parent run carries so that parents can be sorted and compared: per model, and over all
    models, the best batch QPS among runs reaching recall@10 of each target (absent when none reaches it).
    Names group in MLflow's charts: `best_qps_recall90/resnet18`, `best_qps_recall90`."""
    summary: dict[str, float] = {}
    models = sorted({run["model"] for run in runs})
    for target in RECALL_TARGETS:
        name = f"best_qps_recall{round(target * 100)}"
        for model in models:
            best = fastest_reaching([run for run in runs if run["model"] == model], target)
            if best is not None:
                summary[f"{name}/{model}"] = float(best["search_qps_batch"])
        best = fastest_reaching(runs, target)
        if best is not None:
            summary[name] = float(best["search_qps_batch"])
    if runs:
        summary["best_recall_at_10"] = float(max(run["recall_at_10"] for run in runs))
    return summary
