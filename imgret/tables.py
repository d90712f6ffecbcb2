"""The study's tables, each written as `<name>.csv` and `<name>.md` into the report's folder (imgret.report puts them
on one page): the seed table, the operating points, the end-to-end breakdown, scaling, the libraries, the databases,
concurrent clients, cost and precision."""
from __future__ import annotations

import csv
from pathlib import Path

from imgret.index.methods import METHODS, is_database, method_label, method_order
from imgret.measure.cost import cheapest_usd
from imgret.measure.metrics import VS_FP32_METRIC
from imgret.measure.study import (OPERATING_POINTS_HEADER, RECALL_TARGETS, SCALING_METRICS, by_key, growth_exponent,
                                  markdown_table, operating_point_rows, representative, single_query_qps)
from imgret.plots import series_label


def write_table(path_stem: Path, header: list[str], rows: list[list]) -> str:
    """Write `<stem>.csv` and `<stem>.md`; return the Markdown."""
    with open(path_stem.with_suffix(".csv"), "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    markdown = markdown_table(header, rows)
    path_stem.with_suffix(".md").write_text(markdown)
    return markdown


def features_column(run: dict) -> str:
    """A seed-table column: the model, and whether its figures say anything about retrieval (trained weights) or
    only about cost (random weights)."""
    if run["extract_ms_per_image"] != run["extract_ms_per_image"]:  # NaN: a vector source, no images, no weights
        return run["model"]
    return f"{run['model']}, random weights: timings only" if run.get("weights", "").startswith("random") \
        else f"{run['model']}, trained"


def _number(value, form: str) -> str:
    return form.format(value) if value == value else "none (vectors, no images)"  # NaN: nothing was extracted


def seed_table(runs: list[dict], out: Path) -> str:
    """The seed's layout: a column per model (and its weights), the extraction's cost, then per search method the
    single-query p50 latency and the figures at depth 10 (precision@10 and mAP@10 only on trained weights)."""
    columns = sorted({features_column(r) for r in runs}, key=lambda c: (c.endswith("timings only"), c))
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    first = {column: next(r for r in runs if features_column(r) == column) for column in columns}
    rows = [["extraction: ms/image at batch 1", *(_number(first[c]["extract_ms_per_image"], "{:.2f}") for c in columns)],
            ["extraction: images/s batched", *(_number(first[c].get("extract_images_per_s", float("nan")), "{:,.1f}")
                                                for c in columns)]]
    for method in methods:
        row = [f"{method_label(method)}: ms/query p50 · recall@10 · precision@10 · mAP@10"]
        for column in columns:
            group = [r for r in runs if r["method"] == method and features_column(r) == column]
            if not group:
                row.append("")
                continue
            pick = representative(group)
            quality = ("–", "–") if column.endswith("timings only") else \
                (f"{pick.get('precision_at_10', float('nan')):.4f}", f"{pick.get('map_at_10', float('nan')):.4f}")
            cell = f"{pick['search_ms_p50']:.3f} · {pick['recall_at_10']:.4f} · {quality[0]} · {quality[1]}"
            if len(group) > 1:  # several settings were run: say which one the cell shows
                cell += f" ({pick['setting']})"
            row.append(cell)
        rows.append(row)
    return write_table(out / "seed_table", ["", *columns], rows)


def operating_points(runs: list[dict], out: Path) -> str:
    return write_table(out / "operating_points", OPERATING_POINTS_HEADER, operating_point_rows(runs))


def end_to_end(runs: list[dict], out: Path) -> tuple[str, dict]:
    """Extraction per image against search per query: does extraction dominate, and by how much?"""
    rows, breakdown = [], {}
    for (model,), group in sorted(by_key(runs, "model").items()):
        extract_ms = group[0]["extract_ms_per_image"]
        extract_throughput_ms = 1000.0 / group[0]["extract_images_per_s"]
        searches = {method: representative(method_runs)["search_ms_p50"]
                    for (method,), method_runs in sorted(by_key(group, "method").items())}
        breakdown[model] = {"extract_ms": extract_ms, "extract_throughput_ms": extract_throughput_ms,
                            "search_ms": searches}
        for method, search_ms in searches.items():
            ratio = extract_ms / search_ms
            rows.append([model, f"{extract_ms:.2f}", f"{extract_throughput_ms:.2f}", method_label(method),
                         f"{search_ms:.3f}", f"{ratio:,.1f}×", "yes" if ratio > 1 else "no"])
    header = ["model", "extraction ms/image (batch 1)", "extraction ms/image (batched, end to end)", "search",
              "search ms/query (p50)", "extraction ÷ search", "extraction dominates"]
    return write_table(out / "end_to_end", header, rows), breakdown


def scaling_table(runs: list[dict], out: Path) -> str:
    """Per model and method setting: each metric at every gallery size, and its growth exponent."""
    sizes = sorted({int(r["gallery_size"]) for r in runs})
    rows = []
    for (model, method, setting), group in sorted(by_key(runs, "model", "method", "setting").items(),
                                                  key=lambda item: (item[0][0], method_order(item[0][1]))):
        at_size = {int(r["gallery_size"]): r for r in group}
        for key, label in SCALING_METRICS:
            scale = 1e-9 if key == "peak_rss_bytes" else 1.0
            cells = [f"{at_size[n].get(key, float('nan')) * scale:.4g}" if n in at_size else "" for n in sizes]
            exponent = growth_exponent(list(at_size), [r.get(key, float("nan")) for r in at_size.values()])
            rows.append([model, series_label(method, "", setting), label, *cells,
                         "" if exponent != exponent else f"{exponent:+.2f}"])
    header = ["model", "index", "metric", *[f"{n:,}" for n in sizes], "exponent b (∝ size^b)"]
    return write_table(out / "scaling", header, rows)


def libraries_table(runs: list[dict], out: Path) -> str:
    """Per model and method: its build's cost (time, index size, the run's peak memory), its order, and the fastest
    setting reaching each recall@10 target, one query per call and in a batch."""
    header = ["model", "method", "orders by", "build s", "index MiB", "peak RSS GiB",
              *[f"recall@10 ≥ {t:.2f}: setting, QPS single / batch" for t in RECALL_TARGETS]]
    rows = []
    for (model, method), group in sorted(by_key(runs, "model", "method").items(),
                                         key=lambda item: (item[0][0], method_order(item[0][1]))):
        row = [model, method_label(method), METHODS[method].ordering if method in METHODS else "?",
               f"{max(r['build_s'] for r in group):.1f}", f"{max(r['index_bytes'] for r in group) / 2**20:,.0f}",
               f"{max(r.get('peak_rss_bytes', float('nan')) for r in group) / 2**30:.2f}"]
        for target in RECALL_TARGETS:
            best = max((r for r in group if r["recall_at_10"] >= target - 1e-12), key=single_query_qps, default=None)
            row.append("not reached" if best is None else f"{best['setting'] or 'exact'}: "
                       f"{single_query_qps(best):,.0f} / {best['search_qps_batch']:,.0f}")
        rows.append(row)
    return write_table(out / "libraries", header, rows)


def databases_table(runs: list[dict], out: Path) -> str:
    """Per model and vector database: what a database adds (ingest apart from the index's creation, its files on
    disk, its server's memory beside the client's), and the fastest setting reaching each recall@10 target, with
    its throughput under concurrent clients when the sweep measured it (search.clients)."""
    databases = [r for r in runs if is_database(r["method"])]
    clients = sorted({int(key.removeprefix("qps_clients_")) for r in databases for key in r
                      if key.startswith("qps_clients_")})
    header = ["model", "database (query path)", "ingest s", "index creation s", "on disk MiB", "server peak RSS GiB",
              "client peak RSS GiB", *[f"recall@10 ≥ {t:.2f}: setting, QPS single / batch"
                                      + "".join(f" / {n} clients" for n in clients) for t in RECALL_TARGETS]]
    rows = []
    for (model, method), group in sorted(by_key(databases, "model", "method").items(),
                                         key=lambda item: (item[0][0], method_order(item[0][1]))):
        server = max(r.get("server_peak_rss_bytes", float("nan")) for r in group)
        row = [model, method_label(method), f"{max(r['ingest_s'] for r in group):.1f}",
               f"{max(r['index_create_s'] for r in group):.1f}", f"{max(r['db_disk_bytes'] for r in group) / 2**20:,.0f}",
               "in process" if server != server else f"{server / 2**30:.2f}",
               f"{max(r.get('peak_rss_bytes', float('nan')) for r in group) / 2**30:.2f}"]
        for target in RECALL_TARGETS:
            best = max((r for r in group if r["recall_at_10"] >= target - 1e-12), key=single_query_qps, default=None)
            row.append("not reached" if best is None else f"{best['setting']}: {single_query_qps(best):,.0f} / "
                       f"{best['search_qps_batch']:,.0f}" + "".join(f" / {best.get(f'qps_clients_{n}', float('nan')):,.0f}"
                                                                    for n in clients))
        rows.append(row)
    return write_table(out / "databases", header, rows)


def quantisation_table(runs: list[dict], out: Path) -> str:
    """Per model, method, code and re-ranking: the index's bytes per gallery row against the best recall@10 its
    settings reached and the fastest setting (single-query QPS) reaching each recall@10 target."""
    header = ["model", "method", "codes", "re-ranked", "bytes per vector", "best recall@10",
              *[f"recall@10 ≥ {t:.2f}: setting, QPS" for t in RECALL_TARGETS]]
    rows = []
    keys = ("model", "method", "quantisation", "refine_factor")
    for (model, method, codes, refine), group in sorted(by_key(runs, *keys).items(),
                                                       key=lambda item: (item[0][0], method_order(item[0][1]), item[0][2:])):
        size = sorted(r["index_bytes"] / r["gallery_size"] for r in group)[len(group) // 2]
        row = [model, method_label(method), codes, "no" if refine in ("1", "null", "None") else f"{refine} x k",
               f"{size:,.1f}", f"{max(r['recall_at_10'] for r in group):.4f}"]
        for target in RECALL_TARGETS:
            best = max((r for r in group if r["recall_at_10"] >= target - 1e-12), key=single_query_qps, default=None)
            row.append("not reached" if best is None else f"{best['setting']}: {single_query_qps(best):,.0f}")
        rows.append(row)
    return write_table(out / "quantisation", header, rows)


def clients_table(runs: list[dict], out: Path, target: float = 0.95) -> str:
    """Per method measured under concurrent clients (search.clients), libraries and databases alike: the fastest
    setting (single-query QPS) reaching `target` recall@10, with its QPS and p99 latency at each client count."""
    counts = sorted({int(key.removeprefix("qps_clients_")) for r in runs for key in r if key.startswith("qps_clients_")})
    header = ["model", "method", f"setting (fastest at recall@10 ≥ {target:.2f})",
              *[f"{n} client{'s' * (n > 1)}: QPS, p99 ms" for n in counts]]
    rows = []
    for (model, method), group in sorted(by_key(runs, "model", "method").items(),
                                         key=lambda item: (item[0][0], method_order(item[0][1]))):
        measured = [r for r in group if r["recall_at_10"] >= target - 1e-12 and f"qps_clients_{counts[0]}" in r]
        best = max(measured, key=single_query_qps, default=None)
        if best is not None:
            rows.append([model, method_label(method), best["setting"],
                         *[f"{best[f'qps_clients_{n}']:,.0f}, {best[f'search_ms_p99_clients_{n}']:.2f}" for n in counts]])
    return write_table(out / "clients", header, rows)


def precision_table(runs: list[dict], out: Path) -> str:
    """Per model, backend and precision: the extraction's speed as each store was made, and what the rows give in
    retrieval (exact search: a method without an index's own error), beside PyTorch eager fp32's."""
    header = ["model", "backend", "precision", "extraction img/s (as the stores were made)", "ms/image (batch 1)",
              "method", "precision@10", "mAP@10", "recall@10 vs fp32 neighbours"]
    rows = []
    order = {"32-true": 0, "bf16-mixed": 1, "int8": 2}
    for r in sorted(runs, key=lambda r: (r["model"], r["method"], r["backend"] != "torch", r["backend"],
                                         order.get(r["precision"], 9))):
        vs_fp32 = r.get(VS_FP32_METRIC)
        reference = r["backend"] == "torch" and r["precision"] == "32-true"
        rows.append([r["model"], r["backend"], r["precision"], f"{r['extract_images_per_s']:.1f}",
                     f"{r['extract_ms_per_image']:.2f}", method_label(r["method"]), f"{r['precision_at_10']:.4f}",
                     f"{r['map_at_10']:.4f}", "(the reference)" if reference else
                     f"{vs_fp32:.4f}" if vs_fp32 is not None else "no fp32 stores"])
    return write_table(out / "precision", header, rows)




def _usd(value: float) -> str:
    return "n/a" if value != value else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def cost_table(runs: list[dict], out: Path) -> tuple[str, list[str]]:
    """Per model and method: its build's cost and, at each recall@10 target, the cheapest setting reaching it and what
    a million queries cost there (one client, and the best of its concurrent-client counts); and per model and
    target, which method was cheapest."""
    priced = [r for r in runs if "usd_per_million_queries" in r]
    header = ["model", "method", "build US$", *[f"recall@10 ≥ {t:.2f}: setting, US$ per million queries one client / "
                                                 "cheapest" for t in RECALL_TARGETS]]
    rows, verdicts = [], []
    for (model,), of_model in sorted(by_key(priced, "model").items()):
        cheapest: dict[float, tuple[float, str]] = {}
        for (method,), group in sorted(by_key(of_model, "method").items(), key=lambda item: method_order(item[0][0])):
            row = [model, method_label(method), _usd(max(r["build_usd"] for r in group))]
            for target in RECALL_TARGETS:
                best = min((r for r in group if r["recall_at_10"] >= target - 1e-12), key=cheapest_usd, default=None)
                if best is None:
                    row.append("not reached")
                    continue
                row.append(f"{best['setting'] or 'exact'}: {_usd(best['usd_per_million_queries'])} / "
                           f"{_usd(cheapest_usd(best))}")
                if cheapest_usd(best) < cheapest.get(target, (float("inf"), ""))[0]:
                    cheapest[target] = (cheapest_usd(best), f"{method_label(method)} ({best['setting'] or 'exact'})")
            rows.append(row)
        verdicts += [f"- {model}, recall@10 ≥ {target:.2f}: cheapest is {where}, {_usd(usd)} per million queries"
                     for target, (usd, where) in sorted(cheapest.items())]
    return write_table(out / "cost", header, rows), verdicts
