"""Finished points: a sweep point whose effective configuration and provenance already have a FINISHED run in the
experiment is linked to it (a child run carrying its metrics, tagged `imgret.reused_run_id`), not run again."""
from __future__ import annotations

import logging
import time

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from imgret.track import lifecycle
from imgret.track.provenance import PROVENANCE_TAG, provenance_tags
from imgret.track.runs import PointRecord, flatten

log = logging.getLogger(__name__)


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
                      point: PointRecord | None = None) -> str:
    """A child of `parent_run_id` standing for `original`: its metrics and tags, and the tag
    `imgret.reused_run_id` naming it. The report then covers the whole sweep without running the point again.
    With `point` (this point's record), the link keeps this point's own params and overrides: a flat point at
    nprobe=4 linked to the flat run made at nprobe=1 still says nprobe=4."""
    skip = ("mlflow.parentRunId", lifecycle.HOST_TAG, lifecycle.PID_TAG, lifecycle.STARTED_TAG)
    tags = {k: v for k, v in original.data.tags.items() if k not in skip}
    tags.update({"mlflow.parentRunId": parent_run_id, "imgret.reused_run_id": original.info.run_id,
                 # what this run did itself: nothing was extracted or built for it, by this process
                 "embeddings_extracted": "none", "index_built": "false", **lifecycle.process_tags()})
    params = dict(original.data.params)
    if point is not None:  # this point's config; what was searched is the original's
        params = {**{k: v for k, v in params.items() if k in ("gallery_size", "query_size", "dim")},
                  **{k: str(v)[:6000] for k, v in flatten(point.config).items()}}
        if point.output_dir is not None:  # a Hydra job: its own overrides
            tags["overrides"] = " ".join(point.overrides)
    link = client.create_run(experiment_id, run_name=original.info.run_name, tags=tags)
    now = int(time.time() * 1000)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(link.info.run_id, params=items[start:start + 100])
    client.log_batch(link.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in original.data.metrics.items()])
    client.set_terminated(link.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return link.info.run_id
