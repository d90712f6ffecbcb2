"""The Hydra callback that gives a multirun its MLflow parent run, light to import.

Hydra instantiates its callbacks at every start, single runs included. The parent run's work lives in
imgret.track.runs, which imports MLflow (seconds); it is loaded when a multirun starts, so that a single run's
first line on screen does not wait for it.
"""
from __future__ import annotations

import logging

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class MultirunParentRun(Callback):
    """Groups a Hydra multirun's jobs under one MLflow parent run (imgret.track.runs.SweepParent)."""

    def __init__(self) -> None:
        self.parent = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # on screen at once: checking every point imports torch, timm and faiss, opening the store MLflow
        log.info("checking every point of the sweep, then opening the parent run in %s ...", config.tracking.uri)
        from imgret.track.runs import SweepParent

        self.parent = SweepParent()
        self.parent.on_multirun_start(config, **kwargs)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if self.parent is not None:  # None in a launcher's worker process: the parent counts its children instead
            self.parent.on_job_end(config, job_return, **kwargs)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.parent is not None:
            self.parent.on_multirun_end(config, **kwargs)
