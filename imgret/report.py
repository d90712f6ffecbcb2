"""`python -m imgret.report`: read a multirun back from MLflow and write the accuracy-vs-speed study.

Writes to a folder (default outputs/report/<parent run id>) and attaches the same files to the parent run:
  seed_table.md/.csv       rows: extraction's cost and each search method's p50, recall, precision and mAP at 10;
                           columns: the models (random weights marked: timings only)
  operating_points.md/.csv the fastest setting of each index reaching recall@10 of 0.90, 0.95 and 0.99
  end_to_end.md/.csv       extraction per image against search per query, per model
  pareto_<model>.png       recall@10 against QPS and against p99 latency, the frontier joined
  end_to_end.png           the breakdown as bars
  scaling.md/.csv, scaling_<model>.png
                           when the runs cover several gallery sizes: build time, QPS, p99 latency, peak
                           memory and recall@10 against gallery size (log-log), with fitted growth exponents
  runs.csv, report.md      every point, and all of the above on one page
  report.html              the same page, self-contained (images inlined): MLflow's artifact viewer shows it
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import logging
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from imgret.index.methods import METHODS, method_label, method_order
from imgret.measure.metrics import VS_FP32_METRIC
from imgret.options import config_defaults
from imgret.measure.study import (OPERATING_POINTS_HEADER, RECALL_TARGETS, SCALING_METRICS, by_key, filtered_rows,
                                  gallery_words, growth_exponent, markdown_table, operating_point_rows,
                                  provenance_lines, representative, single_query_qps)
from imgret.plots import (end_to_end_plot, features_of, filtered_plot, ivf_nprobe_plot, libraries_plot, pareto_plot,
                          scaling_plot, series_label)
from imgret.track.study_rows import load_runs

log = logging.getLogger(__name__)

# From this gallery size on, every report has the libraries table (build time, index size, peak memory, operating
# points), FAISS's indexes alone included: at that size those costs are what the study is about.
BEYOND_MEMORY_ROWS = 5_000_000

# --------------------------------------------------------------------------- reading runs


def find_parent(client: MlflowClient, experiment_id: str, parent_id: str | None):
    """The given parent run, or the newest sweep whose points all finished (status FINISHED)."""
    if parent_id:
        return client.get_run(parent_id)
    parents = client.search_runs([experiment_id], filter_string="tags.`imgret.role` = 'multirun' and "
                                 "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SystemExit("no finished multirun in this experiment: run `python -m imgret.run -m ...` first, "
                         "or pass --parent RUN_ID (an unfinished sweep's report lists what is missing) or --all-runs")
    return parents[0]


def missing_points(client: MlflowClient, parent) -> list[str] | None:
    """The planned points of a sweep without a FINISHED child run (as their override strings); None when the
    sweeper made no plan (a sweeper other than Hydra's basic one). A plan or runs that cannot be read raise:
    a sweep is never called complete without being checked."""
    if parent.data.tags.get("planned_jobs", "unknown") == "unknown":
        return None
    try:
        planned = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/planned_points.json")
    except Exception as error:
        raise SystemExit(f"error: cannot check whether sweep {parent.info.run_id} is complete: its plan "
                         f"(planned_points.json, {parent.data.tags['planned_jobs']} points) cannot be read "
                         f"({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})") from error
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = "
                                  f"'{parent.info.run_id}' and attributes.status = 'FINISHED'", max_results=50000)
    finished = {run.data.tags.get("overrides", "") for run in children}
    skipped = {" ".join(point) for point in planned["skipped"]}
    return [" ".join(point) for point in planned["points"] if " ".join(point) not in finished | skipped]


# --------------------------------------------------------------------------- tables


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
    return f"{run['model']}, random weights: timings only" if run.get("weights", "").startswith("random") \
        else f"{run['model']}, trained"


def _number(value, form: str) -> str:
    return form.format(value) if value == value else "–"  # NaN: not measured (vectors without images)


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


# --------------------------------------------------------------------------- plots


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
    databases = [r for r in runs if r["method"] in METHODS and METHODS[r["method"]].extra == "db"]
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


# --------------------------------------------------------------------------- the report


def write_report(runs: list[dict], out: Path, title: str) -> Path:
    if not runs:
        raise SystemExit("no finished runs to report on")
    out.mkdir(parents=True, exist_ok=True)
    header = ["model", "method", "setting", "recall_at_10", "recall_at_10_ties", "search_qps_batch",
              "search_ms_p50", "search_ms_p99", "build_s", "index_bytes", "index_built", "run_id"]
    write_table(out / "runs", header, [[r.get(k, "") for k in header] for r in runs])
    parts = [f"# {title}\n", f"{gallery_words(runs)}; {len(runs)} finished runs.\n",
             "## Provenance: what produced these points\n", "\n".join(provenance_lines(runs)) + "\n"]
    gallery_sizes = sorted({int(r["gallery_size"]) for r in runs})
    if len(gallery_sizes) > 1:
        parts += ["## Scaling with the gallery\n", "Each metric at every gallery size, and b from a least-squares "
                  "fit of log(metric) on log(gallery size): the metric grows as size^b.\n", scaling_table(runs, out)]
        for (model,), group in sorted(by_key(runs, "model").items()):
            scaling_plot(model, group, out / f"scaling_{model}.png")
            parts.append(f"![scaling {model}](scaling_{model}.png)\n")
        runs = [r for r in runs if int(r["gallery_size"]) == gallery_sizes[-1]]
        parts.append(f"\nThe sections below are the largest gallery's runs ({gallery_sizes[-1]:,} vectors).\n")
    parts += ["## Seed table\n", seed_table(runs, out),
             "\n## Operating points: the fastest setting reaching each recall\n", operating_points(runs, out)]
    extracted = [r for r in runs if r["extract_ms_per_image"] == r["extract_ms_per_image"]]  # not NaN: images
    if extracted:  # vector sources extract nothing: no breakdown to draw
        e2e_markdown, breakdown = end_to_end(extracted, out)
        parts += ["\n## End to end: extraction per image against search per query\n", e2e_markdown,
                  "\n![end to end](end_to_end.png)\n"]
        end_to_end_plot(breakdown, extracted, out / "end_to_end.png")
    libraries = {METHODS[r["method"]].module or "faiss" for r in runs if r["method"] in METHODS}
    # FAISS's own indexes alone on one gallery: the Pareto plots below say it; beyond memory the build, the size and the
    # peak RSS are the question
    if len(libraries) >= 2 or (len({r["method"] for r in runs}) >= 2 and gallery_sizes[-1] >= BEYOND_MEMORY_ROWS):
        parts += ["\n## Libraries: each method's frontier, build cost and operating points\n",
                  "The fastest setting (by single-query QPS) reaching each recall@10; peak RSS is the run's whole "
                  "process (the store, the index and the search).\n", libraries_table(runs, out)]
        for (model,), group in sorted(by_key(runs, "model").items()):
            libraries_plot(model, group, out / f"libraries_{model}.png")
            parts.append(f"![libraries {model}](libraries_{model}.png)\n")
    if any(r["filter"] != "none" for r in runs):
        filtered = [r for r in runs if r["filter"] != "none"]
        table, verdicts = filtered_rows(filtered)
        parts += ["\n## Filtered search: recall against speed at each selectivity\n",
                  "The fastest setting (single-query QPS) reaching recall@10 0.95 against the exact filtered "
                  "neighbours, per filter and method, and how the method searched under the filter.\n",
                  write_table(out / "filtered", ["filter", "method", "how it filters", "recall@10 ≥ 0.95: setting, QPS"],
                              table), "\n".join(verdicts) + "\n"]
        for (model,), group in sorted(by_key(filtered, "model").items()):
            filtered_plot(model, group, out / f"filtered_{model}.png")
            parts.append(f"![filtered {model}](filtered_{model}.png)\n")
    if any(METHODS[r["method"]].extra == "db" for r in runs if r["method"] in METHODS):
        parts += ["\n## Vector databases: what a database adds\n",
                  "Ingest: the gallery's rows loaded, apart from the index's creation (both when the database was "
                  "made). Server peak RSS: the largest sum of resident sets over the server's process tree, sampled "
                  "while the run lasted (for a database reused from the cache, while it searched); an embedded "
                  "database lives in the client's process. QPS under N clients: N threads each sending one query "
                  "at a time for `search.clients_s` seconds, each on its own connection.\n", databases_table(runs, out)]
    if any(key.startswith("qps_clients_") for r in runs for key in r):
        parts += ["\n## Throughput under concurrent clients\n", clients_table(runs, out)]
    extractions = {(r["backend"], r["precision"]) for r in extracted}
    if len(extractions) > 1:
        parts += ["\n## Precision and backend: what a cheaper extraction costs in retrieval\n",
                  "recall@10 vs fp32: the search over each run's rows against the exact neighbours of PyTorch eager "
                  "fp32's rows of the same images. Extraction speed is each store's own, under the load of its time; "
                  "`python -m imgret.bench --parts precision` measures the speeds interleaved.\n",
                  precision_table(extracted, out)]
    ivf_features = {features_of(r) for r in runs if r["method"] == "ivf"}
    if len(ivf_features) > 1:
        parts += ["\n## IVF on trained and on random features\n",
                  f"Recall@10 against nprobe for {' and for '.join(sorted(ivf_features))}.\n",
                  "![IVF recall against nprobe](ivf_nprobe.png)\n"]
        ivf_nprobe_plot(runs, out / "ivf_nprobe.png")
    parts.append("\n## Pareto frontiers\n")
    for (model,), group in sorted(by_key(runs, "model").items()):
        pareto_plot(model, group, out / f"pareto_{model}.png")
        parts.append(f"![{model}](pareto_{model}.png)\n")
    (out / "report.md").write_text("\n".join(parts))
    (out / "report.html").write_text(markdown_page("\n".join(parts), out, title))
    return out


def markdown_page(markdown: str, folder: Path, title: str) -> str:
    """report.md as one self-contained HTML page (markdown-it-py, CommonMark with tables), its images inlined as
    data: URIs, so that MLflow's artifact viewer, which shows an .html artifact but not the images beside it,
    renders the whole report."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = renderer.parse(markdown)
    for token in tokens:
        for child in token.children or ():
            source = child.attrGet("src") if child.type == "image" else None
            if source and "://" not in source and (folder / source).is_file():
                child.attrSet("src", "data:image/png;base64," + base64.b64encode((folder / source).read_bytes()).decode())
    style = ("body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330}table{border-collapse:collapse;"
             "margin:8px 0 16px}td,th{border:1px solid #d8dde6;padding:3px 8px;text-align:left}th{background:#f2f4f7}"
             "img{max-width:100%;margin:8px 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + renderer.renderer.render(tokens, renderer.options, {}) +
            "</body></html>\n")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m imgret.report", description=__doc__.splitlines()[0])
    tracking = config_defaults().tracking  # the defaults of imgret.run's tracking group
    parser.add_argument("--tracking-uri", default=tracking.uri, help=f"the tracking store (default: {tracking.uri})")
    parser.add_argument("--experiment", default=tracking.experiment,
                        help=f"MLflow experiment name (default: {tracking.experiment})")
    parser.add_argument("--parent", help="the multirun's parent run id (default: the latest multirun)")
    parser.add_argument("--all-runs", action="store_true", help="every finished run of the experiment instead")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/report/<parent id>)")
    args = parser.parse_args(argv)

    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment {args.experiment!r} at {args.tracking_uri}")
    parent = None if args.all_runs else find_parent(client, experiment.experiment_id, args.parent)
    runs = load_runs(client, experiment.experiment_id, parent.info.run_id if parent else None)
    if parent is None:  # every run once: a link stands for a run that is already in the list
        runs = [run for run in runs if not run.get("reused_run_id")]
    name = parent.info.run_id if parent else f"experiment-{experiment.experiment_id}"
    out = args.out or Path("outputs") / "report" / name
    title = f"imgret report: {parent.info.run_name if parent else args.experiment}"
    missing = missing_points(client, parent) if parent is not None else []
    if missing is None:
        print(f"sweep {parent.info.run_id} has no plan (its sweeper is not Hydra's basic one): whether every point "
              "finished is not known", file=sys.stderr)
        title += " (completeness unknown: the sweeper made no plan)"
    elif missing:
        print(f"sweep {parent.info.run_id} is incomplete ({parent.info.status}): {len(missing)} planned points have "
              "no finished run:", file=sys.stderr)
        for point in missing:
            print(f"  missing: {point}", file=sys.stderr)
        title += f" (INCOMPLETE: {len(missing)} points missing)"
    provenances = provenance_lines(runs)
    if len(provenances) > 1:
        print("\n".join(provenances), file=sys.stderr)
    write_report(runs, out, title)
    if parent is not None:
        client.log_artifacts(parent.info.run_id, str(out), artifact_path="report")
    print((out / "report.md").read_text())
    print(f"written to {out}" + (f" and attached to run {parent.info.run_id}" if parent else ""), file=sys.stderr)
    return out


def console() -> None:
    """The `imgret-report` command: exit 0 when done (main's return value is for callers in Python)."""
    main()


if __name__ == "__main__":
    main()
