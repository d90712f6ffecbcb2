"""The Hydra callback of a multirun: every point is checked before the first job, then the sweep gets its MLflow
parent run. Light to import: Hydra instantiates its callbacks at every start, single runs included, and the
parent run's work (imgret.track.parent) imports MLflow (seconds); it is loaded when a multirun starts, so that a
single run's first line on screen does not wait for it.
"""
from __future__ import annotations

import logging
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from imgret.errors import ConfigError, ImgretError, exit_with, hydra_refusal

log = logging.getLogger(__name__)


class MultirunParentRun(Callback):
    """Groups a Hydra multirun's jobs under one MLflow parent run (imgret.track.parent.SweepParent)."""

    def __init__(self) -> None:
        self.parent = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # on screen at once: checking every point imports torch, timm and faiss, opening the store MLflow
        log.info("checking every point of the sweep, then opening the parent run in %s ...", config.tracking.uri)
        from imgret.track import lifecycle
        from imgret.track.parent import SweepParent
        from imgret.track.store import TrackingSettings

        lifecycle.install_signal_handlers()
        points = planned_points(config)
        try:
            skipped = check_sweep(config, points) if points else []
            self.parent = SweepParent()
            self.parent.start(TrackingSettings.of(config.tracking), list(config.hydra.overrides.task),
                              str(config.hydra.sweep.dir), points, skipped)
        except Exception as error:  # one line, before any job or run exists (Hydra's own refusals too)
            refusal = error if isinstance(error, ImgretError) else hydra_refusal(error, sys.argv[1:])
            if refusal is None:
                raise
            exit_with(refusal)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if self.parent is not None:  # None in a launcher's worker process: the parent counts its children instead
            self.parent.job_ended(job_return.status == JobStatus.FAILED)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.parent is not None:
            self.parent.end()


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

    from imgret.validate import invalid_point, validate_config

    loader = GlobalHydra.instance().config_loader()
    skipped = []
    for point in points:
        job_cfg = loader.load_sweep_config(config, list(point))
        if invalid_point(job_cfg) and job_cfg.get("skip_invalid"):
            skipped.append(point)
            continue
        try:
            validate_config(job_cfg)
        except ConfigError as error:
            raise ConfigError(f"{error} (in the sweep point {' '.join(point)})", key=error.key) from error
    return skipped


