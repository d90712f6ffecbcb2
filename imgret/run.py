"""Entry point: `python -m imgret.run [overrides]`, or `-m` for a sweep. Compose, then run and track."""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from imgret.pipeline import run_experiment
from imgret.tracking import log_results, tracked_run

log = logging.getLogger(__name__)


def invalid_combination(cfg: DictConfig) -> str | None:
    """Why this sweep point cannot run, for combinations a cross-product sweep produces (nprobe > nlist)."""
    method = cfg.method
    if "nprobe" in method and "nlist" in method and method.nprobe > method.nlist:
        return f"nprobe={method.nprobe} > nlist={method.nlist}"
    return None


def run_tracked(cfg: DictConfig) -> dict[str, float]:
    reason = invalid_combination(cfg)
    if reason and cfg.get("skip_invalid"):
        log.warning("skipping this job (skip_invalid=true): %s", reason)
        return {}
    with tracked_run(cfg):
        result = run_experiment(cfg)
        log_results(result.metrics, result.info)
    return result.metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_tracked(cfg)


if __name__ == "__main__":
    main()
