"""Tracking stage: every run's parameters, tags, metrics and artifacts in MLflow.

A Hydra multirun gets one parent run (created by the `MultirunParentRun` callback); each job's run is
its child. A job that raises is marked FAILED with the error as a tag, and the error propagates so
Hydra reports it after running the remaining jobs.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

import mlflow
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "IMGRET_PARENT_RUN_ID"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "torchvision", "timm", "open_clip_torch", "faiss-cpu", "faiss-gpu", "mlflow",
             "pytorch-lightning", "hydra-core", "numpy")


def setup_tracking(tracking_cfg) -> str:
    """Point MLflow at the configured store and return the experiment's id, creating it if needed."""
    uri = str(tracking_cfg.uri)
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        db_path.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    name = str(tracking_cfg.experiment)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_root = tracking_cfg.get("artifact_root")
    location = Path(artifact_root).resolve().as_uri() if artifact_root and "://" not in artifact_root else artifact_root
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent job
        return client.get_experiment_by_name(name).experiment_id


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


@functools.lru_cache(maxsize=1)
def environment_tags() -> dict[str, str]:
    tags = {"git_commit": _git(["rev-parse", "HEAD"]) or "unknown"}
    if tags["git_commit"] != "unknown":
        tags["git_dirty"] = str(bool(_git(["status", "--porcelain", "--untracked-files=no"])))
    for library in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{library}"] = metadata.version(library)
    tags["cpu"] = _cpu_name()
    tags["cpu_count"] = str(os.cpu_count())
    import torch

    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    return tags


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_name(cfg: DictConfig) -> str:
    """e.g. resnet18-ivf-nlist256-nprobe8, mobilenet-hnsw-hnsw_m32-ef_construction40-ef_search64."""
    from imgret.index import METHODS

    method = cfg.method
    spec = METHODS.get(method.name)
    keys = (spec.build_params + spec.query_params) if spec else ()
    settings = [str(method[key]) if method.name == "factory" else f"{key}{method[key]}"
                for key in keys if key != "query_chunk" and method.get(key) is not None]
    return "-".join([cfg.model.name, method.name, *settings])


@contextlib.contextmanager
def tracked_run(cfg: DictConfig) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one job: params and tags up front, FAILED with the error if the body raises."""
    experiment_id = setup_tracking(cfg.tracking)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tags = {
        "model": cfg.model.name,
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        **environment_tags(),
    }
    with contextlib.suppress(ValueError):  # outside a Hydra app (tests, notebooks) there are no overrides
        from hydra.core.hydra_config import HydraConfig

        tags["overrides"] = " ".join(HydraConfig.get().overrides.task)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name(cfg),
                           parent_run_id=os.environ.get(PARENT_RUN_ENV), tags=tags)
    try:
        mlflow.log_params(flatten(resolved))
        mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        yield run
    except BaseException as error:
        mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
        mlflow.end_run(status=RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(status=RunStatus.to_string(RunStatus.FINISHED))


def log_results(metrics: dict[str, float], info: dict[str, str]) -> None:
    mlflow.log_metrics(metrics)
    mlflow.set_tags(info)
    mlflow.log_dict({"metrics": metrics, "info": info}, "results.json")


class MultirunParentRun(Callback):
    """Groups a Hydra multirun's jobs under one MLflow parent run."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent_run_id: str | None = None
        self.failed_jobs = 0
        self.jobs = 0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        experiment_id = setup_tracking(config.tracking)
        self.client = MlflowClient()
        sweep = " ".join(config.hydra.overrides.task)
        run = self.client.create_run(
            experiment_id,
            run_name=f"multirun {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={"imgret.role": "multirun", "sweep": sweep, "sweep_dir": str(config.hydra.sweep.dir),
                  **environment_tags()},
        )
        self.parent_run_id = run.info.run_id
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
        self.client.set_tag(run_id, "jobs", str(self.jobs))
        self.client.set_tag(run_id, "failed_jobs", str(self.failed_jobs))
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))
