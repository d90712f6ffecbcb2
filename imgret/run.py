"""Entry point: `python -m imgret.run [overrides]`, or `-m` for a sweep. Compose, then run and track."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from imgret.pipeline import run_experiment
from imgret.tracking import log_results, tracked_run


def run_tracked(cfg: DictConfig) -> dict[str, float]:
    with tracked_run(cfg):
        result = run_experiment(cfg)
        log_results(result.metrics, result.info)
    return result.metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_tracked(cfg)


if __name__ == "__main__":
    main()
