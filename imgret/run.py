"""Entry point: `python -m imgret.run [overrides]`, or `-m` for a sweep. Check, compose, run and track.

Exit codes: 0 done; 2 a configuration error (one line, no run); 1 another error explained in one line
(the run, if it started, is FAILED); 130/143 interrupted by Ctrl-C/SIGTERM (the run is KILLED).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from imgret.track import lifecycle
from imgret.errors import ImgretError, exit_with, run_hydra_app, storage_error

log = logging.getLogger(__name__)


def run_tracked(cfg: DictConfig) -> dict[str, float]:
    """Check everything, then run and record one point; in a sweep, a point that already finished is
    linked rather than run again (unless force=true)."""
    from imgret.validate import invalid_point, validate_config

    reason = invalid_point(cfg)
    if reason and cfg.get("skip_invalid"):
        log.warning("skipping this job (skip_invalid=true): %s", reason)
        return {}
    validate_config(cfg)  # before the heavy imports below, so that a bad value is answered at once

    from mlflow.tracking import MlflowClient

    from imgret.sources.registry import provide
    from imgret.index.methods import validate_search
    from imgret.pipeline import RunSettings, run_experiment
    from imgret.track.links import finished_run_like, link_finished_run
    from imgret.track.runs import PARENT_RUN_ENV, log_results, tracked_run
    from imgret.track.store import TrackingSettings, open_tracking

    tracking = TrackingSettings.of(cfg.tracking)
    point = point_record(cfg)
    experiment_id = open_tracking(tracking)
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent and not cfg.get("force", False):
        done = finished_run_like(MlflowClient(), experiment_id, point.digest)
        if done is not None:
            link = link_finished_run(MlflowClient(), experiment_id, done, parent, point)
            log.info("this point already finished as run %s: linked as %s, not run again (force=true reruns it)",
                     done.info.run_id, link)
            return dict(done.data.metrics)
    provided = provide(cfg.data, cfg.seed)  # images listed, or vectors planned
    validate_search(cfg.method, cfg.k, provided.gallery_size)
    with tracked_run(point, experiment_id) as recorder:
        try:
            result = run_experiment(RunSettings.from_config(cfg), provided,
                                    lambda: recorder.system_metrics(tracking.system_metrics_s))
        except Exception as error:  # a full, read-only or vanished cache: one line, and the run FAILED with it
            unwritable = storage_error(error, str(cfg.paths.cache), "paths.cache")
            if unwritable is None:
                raise
            raise unwritable from error
        log_results(recorder, result.metrics, result.info, result.texts, result.arrays)
    return result.metrics


def point_record(cfg: DictConfig):
    """What the tracker records of this point (imgret.track.runs.PointRecord), read from the config once."""
    from omegaconf import OmegaConf

    from imgret.sources.registry import has_model
    from imgret.track.runs import PointRecord

    overrides, output_dir = (), None
    with contextlib.suppress(ValueError):  # outside a Hydra app (tests, notebooks): no overrides, no job folder
        from hydra.core.hydra_config import HydraConfig

        overrides, output_dir = tuple(HydraConfig.get().overrides.task), Path(HydraConfig.get().runtime.output_dir)
    return PointRecord(model=str(cfg.model.name) if has_model(cfg.data) else "vectors",
                       method=str(cfg.method.name), dataset=str(cfg.data.name), experiment=str(cfg.tracking.experiment),
                       config=OmegaConf.to_container(cfg, resolve=True), overrides=overrides, output_dir=output_dir)


def extract_only(cfg: DictConfig) -> None:
    """A rank other than 0 under a launcher (torchrun, srun): extract with rank 0; it runs and tracks the rest."""
    from imgret.sources.registry import load_splits
    from imgret.embed.extract import ensure_embeddings
    from imgret.embed.options import ExtractSettings

    ensure_embeddings(load_splits(cfg.data, cfg.seed), ExtractSettings.from_config(cfg))


def objective_values(metrics: dict[str, float], objectives) -> float | tuple[float, ...] | None:
    """What a sweeper optimises: one value, or a tuple for several objectives (NaN for a skipped point)."""
    names = [objectives] if isinstance(objectives, str) else list(objectives or [])
    values = tuple(float(metrics.get(name, float("nan"))) for name in names)
    return values[0] if len(values) == 1 else (values or None)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def main() -> float | tuple[float, ...] | None:
    """`python -m imgret.run` and `imgret-run`: Hydra's refusals of the command line in one line (exit 2)."""
    return run_hydra_app(hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://imgret.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | tuple[float, ...] | None:
    lifecycle.install_signal_handlers()
    # On screen at once: the checks below import torch, timm and faiss (several seconds) before their first word.
    log.info("checking the configuration (%s, %s, %s) ...", cfg.data.get("name"), cfg.model.get("name"),
             cfg.method.get("name"))
    from imgret.embed.launch import process_rank

    if process_rank() != 0:
        return extract_only(cfg)
    try:
        return objective_values(run_tracked(cfg), cfg.get("objectives"))
    except (KeyboardInterrupt, SystemExit):
        code = lifecycle.interruption_exit_code()
        if code is None:
            raise
        print(f"interrupted by {signal.Signals(code - 128).name}: the run is marked KILLED", file=sys.stderr)
        sys.exit(code)
    except ImgretError as error:
        if in_multirun():  # the job is FAILED, and the sweep goes on to the next one
            raise
        exit_with(error)


if __name__ == "__main__":
    main()
