"""Tracking stage: every run's parameters, tags, metrics and artifacts in MLflow, and nothing lost on the way.

- A run (`tracked_run`) keeps what it logs in its output folder too; if the server is lost mid-run (only a failed
  connection counts), the job finishes, its results stay there, and `python -m imgret.track.runs sync <folder>`
  logs them later. A request the store refuses fails the run with its message.
- A sweep point that already finished with the same effective configuration and provenance is linked, not run
  again (imgret.track.links). Opening the store: imgret.track.store; the sweep's parent run: imgret.track.parent.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import mlflow
import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_incrementing

from imgret.errors import TrackingRefused, TrackingUnavailable, exit_with, one_line
from imgret.track import lifecycle
from imgret.track.provenance import provenance_tags
from imgret.track.store import is_connection_failure, run_link, unwritable_store

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "IMGRET_PARENT_RUN_ID"
RECORD = "mlflow_record.json"


# --------------------------------------------------------------------------- what a run records


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


def run_name(method: Mapping, model: str) -> str:
    """e.g. resnet18-ivf-nlist256-nprobe8, mobilenet-hnsw-hnsw_m32-ef_construction40-ef_search64."""
    from imgret.index.methods import METHODS, execution_params

    spec = METHODS.get(method["name"])
    keys = (spec.build_params + spec.query_params) if spec else ()
    shown = [key for key in keys if key not in execution_params() and method.get(key) is not None]
    settings = spec.setting_words(method, shown) if spec else []
    return "-".join([model, method["name"], *settings])


@dataclass(frozen=True)
class PointRecord:
    """What the tracker records of one point, as plain values: an entry point makes it once from its config."""
    model: str  # the model's name, or `vectors` for a source that has no model
    method: str
    dataset: str
    experiment: str  # tracking.experiment
    config: dict  # the resolved config: the run's params and its config.yaml artifact
    overrides: tuple[str, ...] = ()  # what the command line overrode (Hydra's task overrides)
    output_dir: Path | None = None  # the job's output folder (Hydra's); None: a temporary one

    @property
    def name(self) -> str:
        row_filter = self.config.get("filter") or {}
        kind = row_filter.get("kind", "none")
        shown = [] if kind == "none" else [f"filter-{kind}" + (f"{row_filter['selectivity']}"
                                                               if row_filter.get("selectivity") else "")]
        return "-".join([run_name(self.config["method"], self.model), *shown])

    @property
    def digest(self) -> str:
        return lifecycle.config_digest(self.config)


# Writers racing on one sqlite store: "database is locked" past the busy timeout, or two processes inserting the
# same dataset input at once (MLflow looks, then inserts). Another try succeeds: the row is there, or the lock gone.
CONFLICT_RETRIES = 4


def is_write_conflict(error: BaseException) -> bool:
    from sqlalchemy.exc import IntegrityError, OperationalError

    seen, link = set(), error
    while link is not None and id(link) not in seen:
        if isinstance(link, IntegrityError) or (isinstance(link, OperationalError) and "locked" in str(link)):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return "UNIQUE constraint failed" in str(error) or "database is locked" in str(error)


def job_output_dir(point: PointRecord) -> tuple[Path, bool]:
    """The job's output folder; without one (outside a Hydra app), a new temporary folder (True: remove it unless
    it must keep a run whose server was lost)."""
    if point.output_dir is not None:
        return Path(point.output_dir), False
    return Path(tempfile.mkdtemp(prefix="imgret-run-")), True


class RunRecorder:
    """One run's MLflow logging, with everything it logs also kept in a local folder.

    The first tracking call that fails (after MLflow's bounded retries) ends the remote logging: the job goes
    on, and the folder holds what a later `python -m imgret.track.runs sync <folder>` needs."""

    def __init__(self, client: MlflowClient, run_id: str, folder: Path, record: dict):
        self.client, self.run_id, self.folder = client, run_id, Path(folder)
        self.record = {"params": {}, "tags": {}, "metrics": {}, "status": None, **record, "run_id": run_id}
        self.lost: str | None = None
        self.lost_reason = "tracking server lost"  # or: the store's disk is full / read-only
        self.temporary = False  # a folder made for this run alone, removed once the server has everything
        (self.folder / "artifacts").mkdir(parents=True, exist_ok=True)

    def _remote(self, call, *args, **kwargs) -> None:
        if self.lost or self.run_id is None:
            return
        try:
            for attempt in Retrying(retry=retry_if_exception(is_write_conflict), reraise=True,
                                    stop=stop_after_attempt(CONFLICT_RETRIES + 1), wait=wait_incrementing(0.2, 0.2)):
                with attempt:
                    call(*args, **kwargs)
        except Exception as error:
            reason = lost_reason(error)
            if reason is None:
                raise TrackingRefused(f"the tracking store refused {getattr(call, '__name__', 'a call')} for run "
                                      f"{self.run_id}: {one_line(error)}") from error
            self.lost, self.lost_reason = one_line(error), reason
            log.error("%s (%s): the run goes on and keeps its results in %s", reason, self.lost, self.folder)

    def log_params(self, params: dict[str, str]) -> None:
        self.record["params"].update(params)
        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._remote(self.client.log_batch, self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.record["tags"].update({key: str(value) for key, value in tags.items()})
        self._remote(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.record["metrics"].update(metrics)
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self._remote(self.client.log_batch, self.run_id, metrics=items[start:start + 1000])

    def log_text(self, text: str, name: str) -> None:
        path = self.folder / "artifacts" / name
        path.write_text(text)
        self._remote(self.client.log_artifact, self.run_id, str(path))

    def log_array(self, array, name: str) -> None:
        """An array as the artifact `<name>.npy` (numpy's own format: np.load reads it anywhere)."""
        import numpy as np

        path = self.folder / "artifacts" / f"{name}.npy"
        np.save(path, array)
        self._remote(self.client.log_artifact, self.run_id, str(path))

    def log_file(self, source: Path, name: str | None = None) -> None:
        path = self.folder / "artifacts" / (name or Path(source).name)
        if Path(source).resolve() != path.resolve():
            shutil.copyfile(source, path)
        self._remote(self.client.log_artifact, self.run_id, str(path))

    def log_inputs(self, stores: dict[str, tuple[str, int, int]]) -> None:
        """The embedding stores a run searched, as MLflow dataset inputs: context (gallery, queries) ->
        (store folder, rows, dimension). The digest is the store key's, so runs on the same vectors share it."""
        self.record.setdefault("inputs", {}).update(stores)
        inputs = [DatasetInput(Dataset(name=Path(path).name, digest=Path(path).name.rsplit("-", 1)[-1][:36],
                                       source_type="local", source=json.dumps({"uri": str(Path(path).resolve())}),
                                       profile=json.dumps({"num_rows": rows, "dim": dim})),
                               tags=[InputTag("mlflow.data.context", context)])
                  for context, (path, rows, dim) in stores.items()]
        self._remote(self.client.log_inputs, self.run_id, datasets=inputs)

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float | None) -> Iterator[None]:
        """MLflow's system metrics (CPU, memory, disk, network: psutil) every `interval_s` seconds while the body
        runs, under system/ in the run's "System metrics" tab; one last sample when it ends, so that a short
        stage has a point too. Not around the timed search: a sampling thread would be in its figures."""
        if not interval_s or self.lost or self.run_id is None:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=float(interval_s), resume_logging=True,
                                       tracking_uri=mlflow.get_tracking_uri())
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            with contextlib.suppress(Exception):  # the run's results matter more than its last sample
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()

    def end(self, status: str) -> None:
        self.record["status"] = status
        self._remote(self.client.set_terminated, self.run_id, status)
        if not self.lost and self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.lost:
            self.record["lost"] = self.lost
            self.record["temporary"] = self.temporary
            (self.folder / RECORD).write_text(json.dumps(self.record, indent=1))
            print(f"{self.lost_reason} ({self.lost}); this run's results are kept in {self.folder}. Log them "
                  f"later with: python -m imgret.track.runs sync {self.folder}", file=sys.stderr)


def lost_reason(error: BaseException) -> str | None:
    """Why the tracking store stopped taking this run's records, when the run should go on and keep them for
    `sync`: its disk is full or read-only, or its server is unreachable. None: it refused a request (a bug, a
    bad value), which fails the run."""
    unwritable = unwritable_store(error)
    if unwritable:
        return f"tracking store {mlflow.get_tracking_uri()} is {unwritable}"
    return "tracking server lost" if is_connection_failure(error) else None


def start_run(point: PointRecord, experiment_id: str, extra_tags: dict | None = None) -> RunRecorder:
    tags = {
        "mlflow.runName": point.name,
        "model": point.model,
        "method": point.method,
        "dataset": point.dataset,
        lifecycle.DIGEST_TAG: point.digest,
        **lifecycle.process_tags(),
        **provenance_tags(),
        **(extra_tags or {}),
    }
    if point.output_dir is not None:  # a Hydra job (outside one, in tests and notebooks, there are no overrides)
        tags["overrides"] = " ".join(point.overrides)
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    client = MlflowClient()
    record = {"tracking_uri": mlflow.get_tracking_uri(), "experiment_id": experiment_id,
              "experiment": point.experiment, "run_name": tags["mlflow.runName"]}
    reason = None
    try:
        run_id, lost = client.create_run(experiment_id, run_name=tags["mlflow.runName"], tags=tags).info.run_id, None
    except Exception as error:  # the server went away before this job (in a sweep): run it, keep it locally
        reason = lost_reason(error)
        if reason is None:
            raise TrackingRefused(f"the tracking store refused to create the run: {one_line(error)}") from error
        run_id, lost = None, one_line(error)
        log.error("%s (%s): this run keeps its results locally", reason, lost)
    if run_id:
        log.info("MLflow run %s (%s); to see it: %s", run_id, tags["mlflow.runName"],
                 run_link(mlflow.get_tracking_uri(), experiment_id, run_id))
    folder, temporary = job_output_dir(point)
    recorder = RunRecorder(client, run_id, folder, record)
    recorder.temporary = temporary
    recorder.lost = lost
    recorder.lost_reason = reason or recorder.lost_reason
    recorder.record["tags"].update(tags)
    return recorder


@contextlib.contextmanager
def tracked_run(point: PointRecord, experiment_id: str) -> Iterator[RunRecorder]:
    """One job's MLflow run: params and tags up front; FAILED with the error if the body raises, KILLED when
    interrupted (Ctrl-C, SIGTERM)."""
    recorder = start_run(point, experiment_id)
    recorder.log_params(flatten(point.config))
    recorder.log_text(yaml.safe_dump(point.config, sort_keys=False), "config.yaml")
    try:
        yield recorder
    except BaseException as error:
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit)) or lifecycle.received_signal is not None
        try:  # a store that refused a value may still take the error and the status; if not, the error stands
            recorder.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        except TrackingRefused as refused:
            log.error("%s", refused)
        finally:
            with contextlib.suppress(TrackingRefused):
                recorder.end(RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED))
        raise
    else:
        recorder.end(RunStatus.to_string(RunStatus.FINISHED))


def refuse_undeclared(metrics: Mapping[str, float]) -> None:
    """A metric is declared once, in imgret/measure/registry.py: logging one that is not there is imgret's bug."""
    from imgret.measure.registry import undeclared

    if unknown := undeclared(metrics):
        raise RuntimeError(f"metrics not declared in imgret/measure/registry.py: {', '.join(unknown)}")


def log_results(recorder: RunRecorder, metrics: dict[str, float], info: dict[str, str],
                texts: dict[str, str] | None = None, arrays: dict | None = None) -> None:
    from imgret.measure.metrics import RUN_SIZES

    refuse_undeclared(metrics)
    recorder.log_metrics({key: value for key, value in metrics.items() if key not in RUN_SIZES})
    recorder.log_params({key: str(int(metrics[key])) for key in RUN_SIZES if key in metrics})
    recorder.set_tags(info)
    if "gallery_store" in info and "query_store" in info:
        recorder.log_inputs({"gallery": (info["gallery_store"], int(metrics["gallery_size"]), int(metrics["dim"])),
                             "queries": (info["query_store"], int(metrics["query_size"]), int(metrics["dim"]))})
    recorder.log_text(json.dumps({"metrics": metrics, "info": info}, indent=1), "results.json")
    for name, text in (texts or {}).items():
        recorder.log_text(text, name)
    for name, array in (arrays or {}).items():
        recorder.log_array(array, name)


# --------------------------------------------------------------------------- python -m imgret.track.runs sync


def sync(folder: Path) -> str:
    """Log a run kept locally (the server was lost) to its tracking store: into the same run if the store
    has it, else into a new run of the same experiment. Returns the run id. A folder the job made for itself (a
    temporary one) is removed once logged; a job's own output folder keeps the record, renamed `.synced`."""
    record = json.loads((Path(folder) / RECORD).read_text())
    mlflow.set_tracking_uri(record["tracking_uri"])
    client = MlflowClient()
    run_id = record.get("run_id")
    try:
        client.get_run(run_id)
    except Exception:
        experiment = client.get_experiment_by_name(record["experiment"])
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(record["experiment"])
        run_id = client.create_run(experiment_id, run_name=record.get("run_name"), tags=record["tags"]).info.run_id
    recorder = RunRecorder(client, run_id, Path(folder), {})
    recorder.log_params(record["params"])
    recorder.set_tags({**record["tags"], "imgret.synced_from": str(Path(folder).resolve())})
    recorder.log_metrics(record["metrics"])
    for path in sorted((Path(folder) / "artifacts").iterdir()):
        recorder.log_file(path)
    if recorder.lost:
        raise TrackingUnavailable(f"the tracking store is still unreachable: {recorder.lost}")
    client.set_terminated(run_id, record.get("status") or RunStatus.to_string(RunStatus.FINISHED))
    if record.get("temporary"):
        shutil.rmtree(folder, ignore_errors=True)
    else:
        (Path(folder) / RECORD).rename(Path(folder) / f"{RECORD}.synced")
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imgret.track.runs")
    commands = parser.add_subparsers(dest="command", required=True)
    sync_parser = commands.add_parser("sync", help="log a run kept locally while its server was unreachable")
    sync_parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if not (args.folder / RECORD).is_file():
        raise SystemExit(f"error: {args.folder} holds no {RECORD}: nothing to log (already synced?)")
    try:
        print(f"logged {args.folder} as run {sync(args.folder)}")
    except TrackingUnavailable as error:
        exit_with(error)


if __name__ == "__main__":
    main()
