"""A Hydra multirun's MLflow parent run: its jobs hang under it, and it ends FINISHED, FAILED or KILLED with
the job counts, the sweep's summary metrics and its operating points as its description."""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from imgret.measure.study import parent_note, summary_metrics
from imgret.track import lifecycle
from imgret.track.provenance import provenance_tags
from imgret.track.runs import PARENT_RUN_ENV, refuse_undeclared
from imgret.track.study_rows import load_runs
from imgret.track.store import TrackingSettings, open_tracking, run_link

log = logging.getLogger(__name__)


class SweepParent:
    """A Hydra multirun's MLflow parent run: its jobs hang under it (the callback is imgret.sweep's)."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent_run_id: str | None = None
        self.failed_jobs = 0
        self.jobs = 0
        self.skipped_jobs = 0
        self.experiment_id: str | None = None

    def start(self, tracking: TrackingSettings, sweep: list[str], sweep_dir: str, points: list[list[str]] | None,
              skipped: list[list[str]]) -> None:
        """Open the store and the parent run, once every point was checked (imgret.sweep): `sweep` the command
        line's overrides, `points` every job's (None where the sweeper plans none ahead), `skipped` those
        skip_invalid leaves out."""
        experiment_id = open_tracking(tracking)
        self.client = MlflowClient()
        self.experiment_id, self.skipped_jobs = experiment_id, len(skipped)
        run = self.client.create_run(
            experiment_id,
            run_name=f"multirun {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={"imgret.role": "multirun", "sweep": " ".join(sweep), "sweep_dir": sweep_dir,
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

    def job_ended(self, failed: bool) -> None:
        self.jobs += 1
        self.failed_jobs += int(failed)

    def end(self) -> None:
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
            print(f"the sweep's operating points: {run_link(mlflow.get_tracking_uri(), self.experiment_id, run_id)}",
                  file=sys.stderr)
        except Exception as error:  # a lost server: a later start marks the parent KILLED as its process is gone
            log.error("could not close the sweep's parent run %s: %s", run_id, error)


    def _log_summary(self, run_id: str) -> None:
        """The sweep's summary metrics on the parent (imgret.measure.study.summary_metrics), and its operating
        points as the parent's description, which MLflow shows on the run's own page."""
        runs = load_runs(self.client, self.experiment_id, run_id)
        summary = summary_metrics(runs)
        refuse_undeclared(summary)
        if summary:
            self.client.log_batch(run_id, metrics=[Metric(key, value, int(time.time() * 1000), 0)
                                                   for key, value in summary.items()])
        planned = self.client.get_run(run_id).data.tags.get("planned_jobs", "unknown")
        self.client.set_tag(run_id, "mlflow.note.content", parent_note(runs, run_id, planned))
