"""Tracking stage: every run's parameters, tags, metrics and artifacts in MLflow, and nothing lost on the way.

- Opening a store: a sqlite store is created or checked under a file lock beside the database, so any number
  of processes may start on a new store at once; a store broken by an interrupted creation (no runs in it)
  is moved aside and made again, one with runs is reported with what to do. A server must answer within
  about 12 s. RUNNING runs whose process on this host is gone are marked KILLED.
- A run (`tracked_run`) keeps what it logs in its output folder too; if the server is lost mid-run, the job
  finishes, its results stay there, and `python -m imgret.track.runs sync <folder>` logs them later.
- A Hydra multirun gets one parent run (`SweepParent`, through imgret.track.sweep's callback), which checks
  every point of the sweep before the first job, and ends FINISHED, FAILED or KILLED with the job counts.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from imgret.track import lifecycle
from imgret.track.provenance import PROVENANCE_TAG, provenance_tags
from imgret.errors import ConfigError, TrackingRefused, TrackingUnavailable
from imgret.cache import file_lock
from imgret.validate import probe_server

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "IMGRET_PARENT_RUN_ID"
# A server lost mid-run costs one call at most (retries x timeout + backoff, about a minute); after that the
# run is kept locally. Users' own MLFLOW_HTTP_REQUEST_* settings win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "12"}
RECORD = "mlflow_record.json"
# MLflow 3's UI shows an experiment without a kind as GenAI traces; imgret's runs are model-development runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
EXPERIMENT_DESCRIPTION = (
    "imgret: what image retrieval costs and how accurate approximate search is. Each run is one point: images -> "
    "embeddings (model) -> index (method and its settings) -> search, with recall@k against the exact ground truth, "
    "latency, throughput, build time and memory. A sweep's runs hang under a parent run, which carries the sweep's "
    "best QPS at recall@10 >= 0.90/0.95/0.99 and, after `imgret-report`, the study as report/report.html. "
    "Use the Model training view; sort parents by best_qps_recall95, compare children on recall_at_10 and "
    "search_qps_batch.")


# --------------------------------------------------------------------------- opening the store


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(tracking_cfg) -> str | None:
    """Where a new experiment keeps artifacts: `tracking.artifact_root` if set; else beside a sqlite
    database (`artifacts/`), or the server's own (proxied) artifact store for an http(s) URI."""
    root = tracking_cfg.get("artifact_root")
    if root:
        return root if "://" in str(root) else Path(str(root)).expanduser().resolve().as_uri()
    db = sqlite_path(str(tracking_cfg.uri))
    return (db.parent / "artifacts").resolve().as_uri() if db else None


def _get_or_create_experiment(client: MlflowClient, tracking_cfg) -> str:
    """The experiment's id, made if need be, tagged so that MLflow's UI opens it on the runs table (its "Model
    training" view) rather than on an empty GenAI traces page; experiments made before that get the tag too."""
    name = str(tracking_cfg.experiment)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(tracking_cfg),
                                            tags={"mlflow.note.content": EXPERIMENT_DESCRIPTION, **EXPERIMENT_TAGS})
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise TrackingRefused(f"tracking.experiment={name}: this experiment is deleted in {tracking_cfg.uri}; restore "
                              f"it (`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or name "
                              "another experiment")
    for key, value in EXPERIMENT_TAGS.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _records_in(db: Path) -> int | None:
    """How many experiments and runs the file holds (a missing table holds none, a file that is no database
    nothing readable); None when sqlite cannot read it now (locked by another process), so nothing is moved on a
    guess."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)) as connection:
            tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
            return sum(connection.execute(f"select count(*) from {table}").fetchone()[0]
                       for table in ("experiments", "runs") if table in tables)
    except sqlite3.DatabaseError as error:
        return 0 if "not a database" in str(error) else None


def _open_sqlite(tracking_cfg, db: Path) -> str:
    """Open (or create) the store under the lock. Only a store that cannot be opened as one and holds no
    experiment or run (what an interrupted creation leaves) is moved aside and made again; an error after the
    store opened is not the store's fault and moves nothing."""
    uri = str(tracking_cfg.uri)
    with file_lock(db, f"the tracking store {db}"):
        try:
            MlflowClient(uri)._tracking_client.store  # creates the tables, or checks the schema of existing ones
        except Exception as error:  # alembic, sqlalchemy and MLflow errors alike: the store cannot be opened
            first_line = one_line(error)
            records = _records_in(db)
            if records is None:
                raise TrackingUnavailable(f"tracking store {db} cannot be opened ({first_line}); sqlite cannot read "
                                          "it now (another process may hold it locked): nothing was moved, try "
                                          "again") from error
            if records:
                raise TrackingUnavailable(
                    f"tracking store {db} cannot be opened ({first_line}). It holds {records} experiments and runs: "
                    f"back it up, then run `mlflow db upgrade {uri}`, or move it aside to start a new store"
                ) from error
            aside = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            _forget_engine(uri)  # its pooled connections still point at the broken file
            os.replace(db, aside)
            log.warning("tracking store %s could not be opened (%s) and held no experiment or run (an interrupted "
                        "creation): moved it to %s and made a new one", db, first_line, aside)
        return _get_or_create_experiment(MlflowClient(), tracking_cfg)


def _forget_engine(uri: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()


@functools.lru_cache(maxsize=8)
def _open(uri: str, experiment: str, artifact_root: str | None) -> str:
    tracking_cfg = OmegaConf.create({"uri": uri, "experiment": experiment, "artifact_root": artifact_root})
    if is_remote(uri):
        probe_server(uri)
        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        experiment_id = _open_sqlite(tracking_cfg, db)
    else:
        experiment_id = _get_or_create_experiment(MlflowClient(), tracking_cfg)
    lifecycle.close_runs_of_dead_processes(MlflowClient(), [experiment_id])
    return experiment_id


def open_tracking(tracking_cfg) -> str:
    """Point MLflow at the configured store, ready for use, and return the experiment's id."""
    uri = str(tracking_cfg.uri)
    experiment_id = _open(uri, str(tracking_cfg.experiment), tracking_cfg.get("artifact_root"))
    mlflow.set_tracking_uri(uri)
    return experiment_id


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


def run_name(cfg: DictConfig) -> str:
    """e.g. resnet18-ivf-nlist256-nprobe8, mobilenet-hnsw-hnsw_m32-ef_construction40-ef_search64."""
    from imgret.index.methods import EXECUTION_PARAMS, METHODS

    method = cfg.method
    spec = METHODS.get(method.name)
    keys = (spec.build_params + spec.query_params) if spec else ()
    settings = [str(method[key]) if method.name == "factory" else f"{key}{method[key]}"
                for key in keys if key not in EXECUTION_PARAMS and method.get(key) is not None]
    return "-".join([model_label(cfg), method.name, *settings])


def model_label(cfg: DictConfig) -> str:
    """The model's name, or `vectors` for a source that has no model."""
    from imgret.sources.images import is_vector_source

    return "vectors" if is_vector_source(cfg.data) else cfg.model.name


def is_connection_failure(error: BaseException) -> bool:
    """True when `error` says the tracking server could not be reached (refused, reset, timed out, or kept
    failing after MLflow's retries); False for an answer that refuses a request, which is not a lost server."""
    import requests

    lost = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
            ConnectionError, TimeoutError)
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, lost):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


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


def one_line(error: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def job_output_dir() -> tuple[Path, bool]:
    """The Hydra job's output folder; outside a Hydra app, a new temporary folder (True: remove it unless
    it must keep a run whose server was lost)."""
    with contextlib.suppress(ValueError):
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir), False
    return Path(tempfile.mkdtemp(prefix="imgret-run-")), True


class RunRecorder:
    """One run's MLflow logging, with everything it logs also kept in a local folder.

    The first tracking call that fails (after MLflow's bounded retries) ends the remote logging: the job goes
    on, and the folder holds what a later `python -m imgret.track.runs sync <folder>` needs."""

    def __init__(self, client: MlflowClient, run_id: str, folder: Path, record: dict):
        self.client, self.run_id, self.folder = client, run_id, Path(folder)
        self.record = {"params": {}, "tags": {}, "metrics": {}, "status": None, **record, "run_id": run_id}
        self.lost: str | None = None
        self.temporary = False  # a folder made for this run alone, removed once the server has everything
        (self.folder / "artifacts").mkdir(parents=True, exist_ok=True)

    def _remote(self, call, *args, **kwargs) -> None:
        if self.lost or self.run_id is None:
            return
        try:
            for attempt in range(CONFLICT_RETRIES + 1):
                try:
                    call(*args, **kwargs)
                    break
                except Exception as error:
                    if attempt == CONFLICT_RETRIES or not is_write_conflict(error):
                        raise
                    time.sleep(0.2 * (attempt + 1))
        except Exception as error:
            if not is_connection_failure(error):
                raise TrackingRefused(f"the tracking store refused {getattr(call, '__name__', 'a call')} for run "
                                      f"{self.run_id}: {one_line(error)}") from error
            self.lost = one_line(error)
            log.error("tracking server lost (%s): the run goes on and keeps its results in %s", self.lost, self.folder)

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
            (self.folder / RECORD).write_text(json.dumps(self.record, indent=1))
            print(f"tracking server lost ({self.lost}); this run's results are kept in {self.folder}. Log them "
                  f"later with: python -m imgret.track.runs sync {self.folder}", file=sys.stderr)


def start_run(cfg: DictConfig, experiment_id: str, extra_tags: dict | None = None) -> RunRecorder:
    tags = {
        "mlflow.runName": run_name(cfg),
        "model": model_label(cfg),
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        lifecycle.DIGEST_TAG: lifecycle.config_digest(cfg),
        **lifecycle.process_tags(),
        **provenance_tags(),
        **(extra_tags or {}),
    }
    with contextlib.suppress(ValueError):  # outside a Hydra app (tests, notebooks) there are no overrides
        from hydra.core.hydra_config import HydraConfig

        tags["overrides"] = " ".join(HydraConfig.get().overrides.task)
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    client = MlflowClient()
    record = {"tracking_uri": mlflow.get_tracking_uri(), "experiment_id": experiment_id,
              "experiment": str(cfg.tracking.experiment), "run_name": tags["mlflow.runName"]}
    try:
        run_id, lost = client.create_run(experiment_id, run_name=tags["mlflow.runName"], tags=tags).info.run_id, None
    except Exception as error:  # the server went away before this job (in a sweep): run it, keep it locally
        if not is_connection_failure(error):
            raise TrackingRefused(f"the tracking store refused to create the run: {one_line(error)}") from error
        run_id, lost = None, one_line(error)
        log.error("tracking server lost (%s): this run keeps its results locally", lost)
    if run_id:
        from imgret.cli import run_link

        log.info("MLflow run %s (%s); to see it: %s", run_id, tags["mlflow.runName"],
                 run_link(mlflow.get_tracking_uri(), experiment_id, run_id))
    folder, temporary = job_output_dir()
    recorder = RunRecorder(client, run_id, folder, record)
    recorder.temporary = temporary
    recorder.lost = lost
    recorder.record["tags"].update(tags)
    return recorder


@contextlib.contextmanager
def tracked_run(cfg: DictConfig, experiment_id: str) -> Iterator[RunRecorder]:
    """One job's MLflow run: params and tags up front; FAILED with the error if the body raises, KILLED when
    interrupted (Ctrl-C, SIGTERM)."""
    recorder = start_run(cfg, experiment_id)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    recorder.log_params(flatten(resolved))
    recorder.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
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


def log_results(recorder: RunRecorder, metrics: dict[str, float], info: dict[str, str],
                texts: dict[str, str] | None = None) -> None:
    from imgret.measure.metrics import RUN_SIZES

    recorder.log_metrics({key: value for key, value in metrics.items() if key not in RUN_SIZES})
    recorder.log_params({key: str(int(metrics[key])) for key in RUN_SIZES if key in metrics})
    recorder.set_tags(info)
    if "gallery_store" in info and "query_store" in info:
        recorder.log_inputs({"gallery": (info["gallery_store"], int(metrics["gallery_size"]), int(metrics["dim"])),
                             "queries": (info["query_store"], int(metrics["query_size"]), int(metrics["dim"]))})
    recorder.log_text(json.dumps({"metrics": metrics, "info": info}, indent=1), "results.json")
    for name, text in (texts or {}).items():
        recorder.log_text(text, name)


# --------------------------------------------------------------------------- finished points


def finished_run_like(client: MlflowClient, experiment_id: str, digest: str):
    """A FINISHED run of this experiment with the same effective configuration and the same provenance (imgret's
    code, the libraries' versions, the machine), preferring an original over a link to one; None if there is
    none (or the store cannot be asked)."""
    provenance = provenance_tags()[PROVENANCE_TAG]
    try:
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{lifecycle.DIGEST_TAG}` = '{digest}' and "
                                  f"tags.`{PROVENANCE_TAG}` = '{provenance}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time ASC"], max_results=50)
    except Exception as error:
        log.error("could not look for a finished run of this point (%s): running it", error)
        return None
    originals = [run for run in runs if "imgret.reused_run_id" not in run.data.tags]
    return (originals or runs or [None])[0]


def link_finished_run(client: MlflowClient, experiment_id: str, original, parent_run_id: str,
                      cfg: DictConfig | None = None) -> str:
    """A child of `parent_run_id` standing for `original`: its metrics and tags, and the tag
    `imgret.reused_run_id` naming it. The report then covers the whole sweep without running the point again.
    With `cfg` (this point's config), the link keeps this point's own params and overrides: a flat point at
    nprobe=4 linked to the flat run made at nprobe=1 still says nprobe=4."""
    skip = ("mlflow.parentRunId", lifecycle.HOST_TAG, lifecycle.PID_TAG, lifecycle.STARTED_TAG)
    tags = {k: v for k, v in original.data.tags.items() if k not in skip}
    tags.update({"mlflow.parentRunId": parent_run_id, "imgret.reused_run_id": original.info.run_id,
                 # what this run did itself: nothing was extracted or built for it
                 "embeddings_extracted": "none", "index_built": "false"})
    params = dict(original.data.params)
    if cfg is not None:  # this point's config; what was searched is the original's
        params = {**{k: v for k, v in params.items() if k in ("gallery_size", "query_size", "dim")},
                  **{k: str(v)[:6000] for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()}}
        with contextlib.suppress(ValueError):  # outside a Hydra app there are no overrides
            from hydra.core.hydra_config import HydraConfig

            tags["overrides"] = " ".join(HydraConfig.get().overrides.task)
    link = client.create_run(experiment_id, run_name=original.info.run_name, tags=tags)
    now = int(time.time() * 1000)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(link.info.run_id, params=items[start:start + 100])
    client.log_batch(link.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in original.data.metrics.items()])
    client.set_terminated(link.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return link.info.run_id


# --------------------------------------------------------------------------- the sweep's parent run


def planned_points(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, as Hydra's basic sweeper will make them; None for other sweepers."""
    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return [list(point) for batch in BasicSweeper.split_arguments(overrides, None) for point in batch]


def check_sweep(config: DictConfig, points: list[list[str]]) -> list[list[str]]:
    """Compose and check every point before the first job runs; return the points skip_invalid skips."""
    from hydra.core.global_hydra import GlobalHydra

    from imgret.run import invalid_combination
    from imgret.validate import validate_config

    loader = GlobalHydra.instance().config_loader()
    skipped = []
    for point in points:
        job_cfg = loader.load_sweep_config(config, list(point))
        if invalid_combination(job_cfg) and job_cfg.get("skip_invalid"):
            skipped.append(point)
            continue
        try:
            validate_config(job_cfg)
        except ConfigError as error:
            raise ConfigError(f"{error} (in the sweep point {' '.join(point)})", key=error.key) from error
    return skipped


class SweepParent:
    """A Hydra multirun's MLflow parent run: its jobs hang under it (the callback is imgret.track.sweep's)."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent_run_id: str | None = None
        self.failed_jobs = 0
        self.jobs = 0
        self.skipped_jobs = 0
        self.experiment_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        lifecycle.install_signal_handlers()
        points = planned_points(config)
        try:
            skipped = check_sweep(config, points) if points else []
            experiment_id = open_tracking(config.tracking)
        except (ConfigError, TrackingUnavailable, TrackingRefused) as error:  # one line, before any job or run exists
            print(f"{'config error' if isinstance(error, ConfigError) else 'tracking error'}: {error}", file=sys.stderr)
            sys.exit(2)
        self.client = MlflowClient()
        self.experiment_id, self.skipped_jobs = experiment_id, len(skipped)
        sweep = " ".join(config.hydra.overrides.task)
        run = self.client.create_run(
            experiment_id,
            run_name=f"multirun {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={"imgret.role": "multirun", "sweep": sweep, "sweep_dir": str(config.hydra.sweep.dir),
                  "planned_jobs": str(len(points)) if points is not None else "unknown",
                  **lifecycle.process_tags(), **provenance_tags()},
        )
        self.parent_run_id = run.info.run_id
        if points is not None:
            self.client.log_text(self.parent_run_id, json.dumps({"points": points, "skipped": skipped}, indent=1),
                                 "planned_points.json")
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        # Hydra skips on_multirun_end when a job failed (the sweeper re-raises first): close the parent anyway.
        atexit.register(self._close, failed=True)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        self.jobs += 1
        self.failed_jobs += int(job_return.status == JobStatus.FAILED)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._close(failed=self.failed_jobs > 0)

    def _close(self, failed: bool) -> None:
        if self.parent_run_id is None:
            return
        run_id, self.parent_run_id = self.parent_run_id, None
        os.environ.pop(PARENT_RUN_ENV, None)
        try:
            # Launchers that run jobs in other processes (joblib, submitit) call on_job_end there, not here:
            # the children in MLflow count those jobs.
            children = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = "
                                               f"'{run_id}'", max_results=50000)
            jobs = max(self.jobs, len(children) + self.skipped_jobs)
            failed_jobs = max(self.failed_jobs, sum(child.info.status == "FAILED" for child in children))
            status = RunStatus.KILLED if lifecycle.received_signal is not None else \
                RunStatus.FAILED if failed or failed_jobs else RunStatus.FINISHED
            self.client.set_tag(run_id, "jobs", str(jobs))
            self.client.set_tag(run_id, "failed_jobs", str(failed_jobs))
            self.client.set_tag(run_id, "finished_jobs", str(sum(child.info.status == "FINISHED" for child in children)))
            self._log_summary(run_id)
            self.client.set_terminated(run_id, RunStatus.to_string(status))
            from imgret.cli import run_link

            print(f"the sweep's operating points: {run_link(mlflow.get_tracking_uri(), self.experiment_id, run_id)}",
                  file=sys.stderr)
        except Exception as error:  # a lost server: a later start marks the parent KILLED as its process is gone
            log.error("could not close the sweep's parent run %s: %s", run_id, error)


    def _log_summary(self, run_id: str) -> None:
        """The sweep's summary metrics on the parent (imgret.measure.study.summary_metrics), and its operating
        points as the parent's description, which MLflow shows on the run's own page."""
        from imgret.measure.study import summary_metrics
        from imgret.report import load_runs, parent_note

        runs = load_runs(self.client, self.experiment_id, run_id)
        summary = summary_metrics(runs)
        if summary:
            self.client.log_batch(run_id, metrics=[Metric(key, value, int(time.time() * 1000), 0)
                                                   for key, value in summary.items()])
        planned = self.client.get_run(run_id).data.tags.get("planned_jobs", "unknown")
        self.client.set_tag(run_id, "mlflow.note.content", parent_note(runs, run_id, planned))


# --------------------------------------------------------------------------- python -m imgret.track.runs sync


def sync(folder: Path) -> str:
    """Log a run kept locally (the server was lost) to its tracking store: into the same run if the store
    has it, else into a new run of the same experiment. Returns the run id."""
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
        raise SystemExit(f"tracking error: {error}") from None


if __name__ == "__main__":
    main()
