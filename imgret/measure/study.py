"""Accuracy-vs-speed study: small pure functions over runs (dicts of params and metrics)."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from imgret.index.methods import is_exact, method_label

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


def by_key(runs: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for run in runs:
        groups[tuple(run[k] for k in keys)].append(run)
    return groups


def gallery_words(runs: list[dict]) -> str:
    galleries = sorted({int(r["gallery_size"]) for r in runs})
    queries = sorted({int(r["query_size"]) for r in runs})
    if all(r["model"] == "vectors" for r in runs):  # a vector source: no images, no model, no input size
        dims = sorted({int(r["dim"]) for r in runs if "dim" in r})
        return (f"gallery {'/'.join(f'{g:,}' for g in galleries)} vectors of {'/'.join(map(str, dims))} dimensions, "
                f"{'/'.join(f'{q:,}' for q in queries)} queries")
    sizes = sorted({str(r["image_size"]) for r in runs})
    size = "native size" if sizes == ["null"] else \
        " / ".join("the model's own size" if s == "null" else f"{s} px" for s in sizes)
    return (f"gallery {'/'.join(f'{g:,}' for g in galleries)} images, "
            f"{'/'.join(f'{q:,}' for q in queries)} queries, {size}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


OPERATING_POINTS_HEADER = ["model", "index", *[f"recall@10 ≥ {t:.2f}" for t in RECALL_TARGETS]]


def operating_point_rows(runs: list[dict]) -> list[list[str]]:
    """Per model and index, the fastest setting (batch QPS) reaching each recall@10 target."""
    rows = []
    for (model, method), group in sorted(by_key(runs, "model", "method").items()):
        row = [model, method_label(method)]
        for target in RECALL_TARGETS:
            best = fastest_reaching(group, target)
            row.append("not reached" if best is None else
                       f"{best['setting'] or 'exact'}: {best['search_qps_batch']:,.0f} QPS, "
                       f"p99 {best['search_ms_p99']:.3f} ms (R@10 {best['recall_at_10']:.3f})")
        rows.append(row)
    return rows


def provenance_lines(runs: list[dict]) -> list[str]:
    """What produced the points, one line per provenance, most points first; a warning first when they differ."""
    groups = sorted(by_key(runs, "provenance").items(), key=lambda item: -len(item[1]))
    lines = [f"- {len(group)} points, provenance {provenance}: {group[0]['provenance_text']}"
             for (provenance,), group in groups]
    if len(groups) > 1:
        lines.insert(0, f"WARNING: these {len(runs)} points come from {len(groups)} provenances (imgret's code, the "
                        "libraries' versions or the machine differ): compare them with care, or run the sweep again.")
    return lines


def parent_note(runs: list[dict], parent_id: str, planned: str) -> str:
    """The sweep's parent run's description (`mlflow.note.content`, shown on the run's own page in MLflow):
    the answer to "which setting reaches recall R fastest", what produced it, and where the whole study is."""
    if not runs:
        return f"imgret sweep: no finished point with recall@10 (planned points: {planned})."
    return "\n".join([
        f"**imgret sweep**: {len(runs)} finished points (planned: {planned}); {gallery_words(runs)}.",
        "", "**Operating points**: the fastest setting (batch QPS, all queries in one call) reaching each recall@10:",
        "", markdown_table(OPERATING_POINTS_HEADER, operating_point_rows(runs)),
        "**Provenance**:", "", *provenance_lines(runs), "",
        f"The whole study (tables, Pareto plots): `python -m imgret.report --parent {parent_id}`, then "
        "report/report.html among this run's artifacts."])


def single_query_qps(run: dict) -> float:
    """Queries per second one query per call: 1000 / the median single-query latency."""
    return 1000.0 / run["search_ms_p50"] if run["search_ms_p50"] > 0 else float("nan")


def filtered_rows(runs: list[dict], target: float = 0.95) -> tuple[list[list[str]], list[str]]:
    """Per filter (least selective first) and method: the fastest setting (single-query QPS) reaching `target`
    recall@10; and per filter, which method was fastest there, saying where exact search over the allowed rows won."""
    rows, verdicts = [], []
    groups = sorted(by_key(runs, "filter").items(), key=lambda item: -item[1][0].get("filter_selectivity", 1.0))
    for (described,), group in groups:
        best_of = {}
        for (method,), of_method in sorted(by_key(group, "method").items()):
            reaching = [r for r in of_method if r["recall_at_10"] >= target - 1e-12]
            best = max(reaching, key=single_query_qps, default=None)
            best_of[method] = best
            plan = (best or of_method[-1]).get("filter_plan") or "-"
            rows.append([described, method_label(method), of_method[0]["filter_mode"],
                         "not reached" if best is None else
                         f"{best['setting'] or 'exact'}: {single_query_qps(best):,.0f} QPS (R@10 {best['recall_at_10']:.3f})",
                         plan])
        reached = {method: best for method, best in best_of.items() if best is not None}
        if reached:
            fastest = max(reached, key=lambda method: single_query_qps(reached[method]))
            exact = is_exact(fastest)
            verdicts.append(f"- {described}: fastest at recall@10 ≥ {target:.2f} is {method_label(fastest)} "
                            f"({single_query_qps(reached[fastest]):,.0f} QPS)"
                            + (": exact search over the allowed rows wins" if exact else ""))
    return rows, verdicts
