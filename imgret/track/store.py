"""Where runs go: opening (or creating) the tracking store, telling a lost server from a refusal, and the page
where a run can be seen.

A sqlite store is created or checked under a file lock beside the database, so any number of processes may start
on a new store at once; a store broken by an interrupted creation (it holds no experiment and no run) is moved
aside and made again, one that holds any is reported with what to do. A server must answer within about 12 s.
RUNNING runs whose process on this host is gone are marked KILLED.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tenacity import Retrying, retry_if_result, stop_after_delay, stop_any, wait_fixed

from imgret.cache import file_lock
from imgret.errors import TrackingRefused, TrackingUnavailable, bad_value, number, one_line
from imgret.options import config_defaults
from imgret.track import lifecycle

log = logging.getLogger(__name__)

# A server lost mid-run costs one call at most (retries x timeout + backoff, about a minute); after that the
# run is kept locally. Users' own MLFLOW_HTTP_REQUEST_* settings win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "12"}
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


@dataclass(frozen=True)
class TrackingSettings:
    """Where a run's records go (the config's `tracking` group), as an entry point hands them down."""
    uri: str = config_defaults().tracking.uri
    experiment: str = config_defaults().tracking.experiment
    artifact_root: str | None = config_defaults().tracking.artifact_root  # None: beside the store
    system_metrics_s: float | None = config_defaults().tracking.system_metrics_s  # None: no samples

    @staticmethod
    def check_section(tracking) -> None:
        """The `tracking` group's keys, as written: each bad one refused in one line."""
        uri = tracking.get("uri")
        if not isinstance(uri, str) or not uri.startswith(("sqlite:///", "http://", "https://", "file:", "databricks")):
            raise bad_value("tracking.uri", uri, "sqlite:///<path>.db, http(s)://<host>:<port> of an MLflow server, "
                                                 "or file:<folder>")
        if not isinstance(tracking.get("experiment"), str) or not tracking.experiment.strip():
            raise bad_value("tracking.experiment", tracking.get("experiment"), "a non-empty experiment name")
        interval = tracking.get("system_metrics_s")
        if interval is not None and (not number(interval) or interval <= 0):
            raise bad_value("tracking.system_metrics_s", interval, "seconds between system-metric samples (> 0), or "
                                                                 "null for none")

    @classmethod
    def of(cls, tracking) -> "TrackingSettings":
        """From the `tracking` group (any mapping of its keys)."""
        defaults = cls()
        return cls(str(tracking.get("uri", defaults.uri)), str(tracking.get("experiment", defaults.experiment)),
                   tracking.get("artifact_root"), tracking.get("system_metrics_s", defaults.system_metrics_s))


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(tracking: TrackingSettings) -> str | None:
    """Where a new experiment keeps artifacts: `tracking.artifact_root` if set; else beside a sqlite
    database (`artifacts/`), or the server's own (proxied) artifact store for an http(s) URI."""
    root = tracking.artifact_root
    if root:
        return root if "://" in str(root) else Path(str(root)).expanduser().resolve().as_uri()
    db = sqlite_path(tracking.uri)
    return (db.parent / "artifacts").resolve().as_uri() if db else None


def _get_or_create_experiment(client: MlflowClient, tracking: TrackingSettings) -> str:
    """The experiment's id, made if need be, tagged so that MLflow's UI opens it on the runs table (its "Model
    training" view) rather than on an empty GenAI traces page; experiments made before that get the tag too."""
    name = tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(tracking),
                                            tags={"mlflow.note.content": EXPERIMENT_DESCRIPTION, **EXPERIMENT_TAGS})
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise TrackingRefused(f"tracking.experiment={name}: this experiment is deleted in {tracking.uri}; restore "
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


def _open_sqlite(tracking: TrackingSettings, db: Path) -> str:
    """Open (or create) the store under the lock. Only a store that cannot be opened as one and holds no
    experiment or run (what an interrupted creation leaves) is moved aside and made again; an error after the
    store opened is not the store's fault and moves nothing."""
    uri = tracking.uri
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
        return _get_or_create_experiment(MlflowClient(), tracking)


def _forget_engine(uri: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()


@functools.lru_cache(maxsize=8)
def _open(tracking: TrackingSettings) -> str:
    uri = tracking.uri
    if is_remote(uri):
        probe_server(uri)
        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        experiment_id = _open_sqlite(tracking, db)
    else:
        experiment_id = _get_or_create_experiment(MlflowClient(), tracking)
    lifecycle.close_runs_of_dead_processes(MlflowClient(), [experiment_id])
    return experiment_id


def open_tracking(tracking: TrackingSettings) -> str:
    """Point MLflow at the configured store, ready for use, and return the experiment's id."""
    experiment_id = _open(tracking)
    mlflow.set_tracking_uri(tracking.uri)
    return experiment_id



def probe_server(uri: str, seconds: float = 12.0) -> None:
    """Fail within `seconds` if no MLflow server answers at `uri`; a connection refused three times fails at once
    (in about 2 s)."""
    seen = {"reason": "no answer", "refused": 0}

    def answers() -> bool:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=min(5.0, seconds)) as response:
                if response.status == 200:
                    return True
                seen["reason"] = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            seen["reason"] = str(reason)
            seen["refused"] += isinstance(reason, ConnectionRefusedError)
        return False

    refused_thrice = lambda _: seen["refused"] >= 3  # noqa: E731
    if not Retrying(retry=retry_if_result(lambda ok: not ok), wait=wait_fixed(1.0),
                    stop=stop_any(stop_after_delay(seconds), refused_thrice), retry_error_callback=lambda _: False
                    )(answers):
        raise bad_value("tracking.uri", uri, f"an MLflow server that answers; none did ({seen['reason']}). Start one "
                        "(mlflow server --host 127.0.0.1 --port 5000) or use sqlite:///mlruns/mlflow.db")


def unwritable_store(error: BaseException) -> str | None:
    """"full" or "read-only" when `error` says the tracking store's disk refused a write (sqlite's "database or
    disk is full", "attempt to write a readonly database", or the OSError beneath), else None: such a store is
    named as what it is, not as a lost server, and the run's results are kept for `sync` all the same."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        text = str(error).lower()
        number = getattr(error, "errno", None) if isinstance(error, OSError) else None
        if "database or disk is full" in text or number in (errno.ENOSPC, errno.EDQUOT):
            return "full"
        if "readonly database" in text or "read-only file system" in text or number == errno.EROFS:
            return "read-only"
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


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


def run_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to see a run (or, without one, the experiment's runs table): the server's page, or the command that
    serves a local store and the page's address. MLflow 3's UI opens every experiment in its GenAI (traces) view
    whatever the experiment's kind tag says; `workflowType=machine_learning` opens the runs instead."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + "?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {tracking_uri}`, then http://127.0.0.1:5000/{page}"
