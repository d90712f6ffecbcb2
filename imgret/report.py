"""`python -m imgret.report`: read a multirun back from MLflow and write the accuracy-vs-speed study.

Writes to a folder (default outputs/report/<parent run id>) and attaches the same files to the parent run:
  seed_table.md/.csv       rows: extraction's cost and each search method's p50, recall, precision and mAP at 10;
                           columns: the models (random weights marked: timings only)
  operating_points.md/.csv the fastest setting of each index reaching recall@10 of 0.90, 0.95 and 0.99
  end_to_end.md/.csv       extraction per image against search per query, per model
  cost.md/.csv             each method's build cost and the cheapest setting reaching each recall@10, in US$
                           per million queries at the `cost` group's prices
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
import html
import logging
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from imgret.index.methods import METHODS, is_database
from imgret.measure.study import by_key, filtered_rows, gallery_words, provenance_lines
from imgret.options import config_defaults
from imgret.plots import (end_to_end_plot, features_of, filtered_plot, ivf_nprobe_plot, libraries_plot, pareto_plot,
                          scaling_plot)
from imgret.tables import (clients_table, cost_table, databases_table, end_to_end, libraries_table,
                           operating_points, precision_table, quantisation_table, scaling_table, seed_table,
                           write_table)
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


# --------------------------------------------------------------------------- the report


def _scaling_section(runs: list[dict], out: Path) -> list[str]:
    parts = ["## Scaling with the gallery\n", "Each metric at every gallery size, and b from a least-squares fit of "
             "log(metric) on log(gallery size): the metric grows as size^b.\n", scaling_table(runs, out)]
    for (model,), group in sorted(by_key(runs, "model").items()):
        scaling_plot(model, group, out / f"scaling_{model}.png")
        parts.append(f"![scaling {model}](scaling_{model}.png)\n")
    largest = max(int(r["gallery_size"]) for r in runs)
    return parts + [f"\nThe sections below are the largest gallery's runs ({largest:,} vectors).\n"]


def _with_images(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["extract_ms_per_image"] == r["extract_ms_per_image"]]  # not NaN: images


def _end_to_end_section(runs: list[dict], out: Path) -> list[str]:
    extracted = _with_images(runs)
    if not extracted:  # vector sources extract nothing: no breakdown to draw
        return []
    e2e_markdown, breakdown = end_to_end(extracted, out)
    end_to_end_plot(breakdown, extracted, out / "end_to_end.png")
    return ["\n## End to end: extraction per image against search per query\n", e2e_markdown,
            "\n![end to end](end_to_end.png)\n"]


def _libraries_section(runs: list[dict], out: Path) -> list[str]:
    libraries = {METHODS[r["method"]].module or "faiss" for r in runs if r["method"] in METHODS}
    # FAISS's own indexes alone on one gallery: the Pareto plots below say it; beyond memory the build, the size and the
    # peak RSS are the question
    largest = max(int(r["gallery_size"]) for r in runs)
    if len(libraries) < 2 and (len({r["method"] for r in runs}) < 2 or largest < BEYOND_MEMORY_ROWS):
        return []
    parts = ["\n## Libraries: each method's frontier, build cost and operating points\n",
             "The fastest setting (by single-query QPS) reaching each recall@10; peak RSS is the run's whole process "
             "(the store, the index and the search).\n", libraries_table(runs, out)]
    for (model,), group in sorted(by_key(runs, "model").items()):
        libraries_plot(model, group, out / f"libraries_{model}.png")
        parts.append(f"![libraries {model}](libraries_{model}.png)\n")
    return parts


def _filtered_section(runs: list[dict], out: Path) -> list[str]:
    filtered = [r for r in runs if r["filter"] != "none"]
    if not filtered:
        return []
    table, verdicts = filtered_rows(filtered)
    parts = ["\n## Filtered search: recall against speed at each selectivity\n",
             "The fastest setting (single-query QPS) reaching recall@10 0.95 against the exact filtered neighbours, "
             "per filter and method, how the method searched under the filter, and, for an engine that plans its "
             "queries (SQL's EXPLAIN), the plans it chose for a sample of 20 queries (of that setting's run).\n",
             write_table(out / "filtered", ["filter", "method", "how it filters", "recall@10 ≥ 0.95: setting, QPS",
                                            "the engine's plan"],
                         table), "\n".join(verdicts) + "\n"]
    for (model,), group in sorted(by_key(filtered, "model").items()):
        filtered_plot(model, group, out / f"filtered_{model}.png")
        parts.append(f"![filtered {model}](filtered_{model}.png)\n")
    return parts


def _databases_section(runs: list[dict], out: Path) -> list[str]:
    if not any(is_database(r["method"]) for r in runs):
        return []
    return ["\n## Vector databases: what a database adds\n",
            "Ingest: the gallery's rows loaded, apart from the index's creation (both when the database was made). "
            "Server peak RSS: the largest sum of resident sets over the server's process tree, sampled while the run "
            "lasted (for a database reused from the cache, while it searched); an embedded database lives in the "
            "client's process. QPS under N clients: N threads each sending one query at a time for "
            "`search.clients_s` seconds, each on its own connection.\n", databases_table(runs, out)]


def _quantisation_section(runs: list[dict], out: Path) -> list[str]:
    if all(r.get("quantisation", "none") == "none" for r in runs):
        return []
    return ["\n## Quantisation: index bytes against recall and speed\n",
            "Each method's codes (none: full precision) and whether its candidates were re-ranked by the full rows "
            "(refine_factor x k of them: read back from the gallery store, or by the engine's own rescoring), the "
            "index's size over the gallery's rows (a database's: its files on disk), the best recall@10 any of its "
            "settings reached, and the fastest setting reaching each target.\n", quantisation_table(runs, out)]


def _clients_section(runs: list[dict], out: Path) -> list[str]:
    if not any(key.startswith("qps_clients_") for r in runs for key in r):
        return []
    return ["\n## Throughput under concurrent clients\n", clients_table(runs, out)]


def _cost_section(runs: list[dict], out: Path) -> list[str]:
    if not any("usd_per_million_queries" in r for r in runs):  # runs of an imgret that priced nothing
        return []
    table, verdicts = cost_table(runs, out)
    return ["\n## Cost: what a million queries and a build cost\n",
            "At the `cost` group's prices (each run's params): the cores searching, the index in memory and a "
            "database's files on disk, by the hour, over the throughput of one client (one query at a time) or, "
            "cheapest, of the best of its concurrent-client counts; the build's time on its cores. The cheapest "
            "setting of each method reaching each recall@10.\n", table, "\n".join(verdicts) + "\n"]


def _precision_section(runs: list[dict], out: Path) -> list[str]:
    extracted = _with_images(runs)
    if len({(r["backend"], r["precision"]) for r in extracted}) < 2:
        return []
    return ["\n## Precision and backend: what a cheaper extraction costs in retrieval\n",
            "recall@10 vs fp32: the search over each run's rows against the exact neighbours of PyTorch eager fp32's "
            "rows of the same images. Extraction speed is each store's own, under the load of its time; "
            "`python -m imgret.bench --parts precision` measures the speeds interleaved.\n",
            precision_table(extracted, out)]


def _ivf_features_section(runs: list[dict], out: Path) -> list[str]:
    ivf_features = {features_of(r) for r in runs if r["method"] == "ivf"}
    if len(ivf_features) < 2:
        return []
    ivf_nprobe_plot(runs, out / "ivf_nprobe.png")
    return ["\n## IVF on trained and on random features\n",
            f"Recall@10 against nprobe for {' and for '.join(sorted(ivf_features))}.\n",
            "![IVF recall against nprobe](ivf_nprobe.png)\n"]


def _pareto_section(runs: list[dict], out: Path) -> list[str]:
    parts = ["\n## Pareto frontiers\n"]
    for (model,), group in sorted(by_key(runs, "model").items()):
        pareto_plot(model, group, out / f"pareto_{model}.png")
        parts.append(f"![{model}](pareto_{model}.png)\n")
    return parts


# The report's sections after the seed table and the operating points, in order; each is empty where its runs are
# not in the sweep.
SECTIONS = (_end_to_end_section, _libraries_section, _filtered_section, _quantisation_section, _databases_section,
            _clients_section,
            _cost_section, _precision_section, _ivf_features_section, _pareto_section)


def write_report(runs: list[dict], out: Path, title: str) -> Path:
    if not runs:
        raise SystemExit("no finished runs to report on")
    out.mkdir(parents=True, exist_ok=True)
    header = ["model", "method", "setting", "recall_at_10", "recall_at_10_ties", "search_qps_batch",
              "search_ms_p50", "search_ms_p99", "build_s", "index_bytes", "index_built", "run_id"]
    write_table(out / "runs", header, [[r.get(k, "") for k in header] for r in runs])
    parts = [f"# {title}\n", f"{gallery_words(runs)}; {len(runs)} finished runs.\n",
             "## Provenance: what produced these points\n", "\n".join(provenance_lines(runs)) + "\n"]
    largest = max(int(r["gallery_size"]) for r in runs)
    if len({int(r["gallery_size"]) for r in runs}) > 1:
        parts += _scaling_section(runs, out)
        runs = [r for r in runs if int(r["gallery_size"]) == largest]
    parts += ["## Seed table\n", seed_table(runs, out),
              "\n## Operating points: the fastest setting reaching each recall\n", operating_points(runs, out)]
    for section in SECTIONS:
        parts += section(runs, out)
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
