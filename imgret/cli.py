"""What the command line shows: `--help` built from the configs themselves, comments included."""
from __future__ import annotations

from importlib import resources

GROUPS_SKIPPED = ("hydra",)


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# @package"):
            continue
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _without_hydra_section(text: str) -> list[str]:
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("hydra:"):
            skipping = True
        elif skipping and line and not line.startswith((" ", "#")):
            skipping = False
        if not skipping:
            kept.append(line)
    return kept


def help_text(command: str = "imgret-run", primary: str = "config.yaml") -> str:
    """Every config group with each option's first comment line, then the primary config as written (its
    comments say what each key means), then Hydra's flags. `$` is doubled: Hydra fills the template with
    string.Template."""
    conf = resources.files("imgret.conf")
    lines = [f"{command}: image retrieval end to end (images -> embeddings -> index -> search -> recall, "
             "timings, memory -> MLflow).", "",
             f"Usage: {command} [key=value ...]     one run",
             f"       {command} -m [key=a,b ...]    a sweep (Hydra multirun): one run per combination", "",
             "Config groups (choose with group=option):"]
    for group in sorted((d for d in conf.iterdir() if d.is_dir() and not d.name.startswith(("_", *GROUPS_SKIPPED))),
                        key=lambda d: d.name):
        prefix = "+" if group.name == "experiment" else ""
        lines.append(f"  {prefix}{group.name}=")
        for option in sorted((f for f in group.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name):
            lines.append(f"      {option.name[:-5]:<18} {_first_comment(option.read_text())}")
    lines += ["", f"Keys and their defaults (conf/{primary}; any key can be set, e.g. k=5 method.nprobe=16):", ""]
    lines += ["  " + line for line in _without_hydra_section(conf.joinpath(primary).read_text())]
    lines += ["", "Hydra's flags:", "$FLAGS_HELP"]
    return "\n".join(line.replace("$", "$$") if "$FLAGS_HELP" not in line else line for line in lines)


# What a finished run prints: the figures people compare, in the order they read them.
RESULT_ROWS = (
    ("recall@1 / @10 / @k", ("recall_at_1", "recall_at_10", "recall_at_k"), "{:.4f}"),
    ("precision@10", ("precision_at_10",), "{:.4f}"),
    ("search p50 / p99 (ms)", ("search_ms_p50", "search_ms_p99"), "{:.3f}"),
    ("batch search (queries/s)", ("search_qps_batch",), "{:,.0f}"),
    ("extraction (images/s)", ("extract_images_per_s",), "{:,.1f}"),
    ("index build (s) / size (MB)", ("build_s", "index_bytes"), None),
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


def run_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to see a run (or, without one, the experiment's runs table): the server's page, or the command that
    serves a local store and the page's address. MLflow 3's UI opens every experiment in its GenAI (traces) view
    whatever the experiment's kind tag says; `workflowType=machine_learning` opens the runs instead."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + "?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {tracking_uri}`, then http://127.0.0.1:5000/{page}"