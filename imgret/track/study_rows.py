"""The study's runs read back from MLflow as flat rows (dicts of identity, settings, metrics and provenance), for
the report and the sweep's parent run alike."""
from __future__ import annotations

from mlflow.tracking import MlflowClient

from imgret.index.methods import METHODS, execution_params
from imgret.measure.metrics import RUN_SIZES
from imgret.track.provenance import PROVENANCE_TAG, describe as describe_provenance


def load_runs(client: MlflowClient, experiment_id: str, parent_id: str | None) -> list[dict]:
    """Finished runs as flat dicts: identity, the method's settings and every metric."""
    query = "attributes.status = 'FINISHED'"
    if parent_id:
        query += f" and tags.mlflow.parentRunId = '{parent_id}'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=50000)
    rows = []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        if "method" not in tags or "recall_at_10" not in metrics:  # k < 10: no recall@10 from the timed search
            continue
        method = tags["method"]
        if method not in METHODS:  # a run of a method this imgret no longer has
            continue
        spec, executing = METHODS[method], execution_params()
        keys = [k for k in spec.build_params + spec.query_params if k not in executing]
        rows.append({
            "run_id": run.info.run_id, "model": tags["model"], "method": method,
            "setting": " ".join(f"{k}={params.get(f'method.{k}')}" for k in keys
                                if params.get(f"method.{k}", "null") != "null"),
            "build": " ".join(f"{k}={params.get(f'method.{k}')}" for k in spec.build_params
                              if k not in executing and params.get(f"method.{k}", "null") != "null"),
            "index_built": tags.get("index_built", ""),
            "filter": tags.get("filter", "none"),  # runs of an imgret without filters searched unfiltered
            "filter_mode": tags.get("filter_mode", "none"),
            "filter_plan": tags.get("filter_plan", ""),
            "quantisation": params.get("method.quantisation", "none"),  # the codes a quantising method kept
            "refine_factor": params.get("method.refine_factor", "null"),  # an SQL engine's plans for a sample of the filtered queries
            "search_threads": tags.get("search_threads", "?"),
            "weights": tags.get("weights", ""),
            # the extraction's backend and precision as it ran (auto resolved: the tag), for image sources
            "backend": params.get("extract.backend", "torch"),
            "precision": tags.get("extract_precision", params.get("extract.precision", "")),
            "reused_run_id": tags.get("imgret.reused_run_id", ""),
            "image_size": params.get("model.image_size", ""),
            "provenance": tags.get(PROVENANCE_TAG, "unknown"),
            "provenance_text": describe_provenance(tags) if PROVENANCE_TAG in tags else
            "unknown (a run of an imgret that recorded no provenance)",
            **metrics,  # runs of earlier versions logged the sizes as metrics; now they are params
            **{key: float(params[key]) for key in RUN_SIZES if key in params},
        })
    return sorted(rows, key=lambda r: (r["model"], r["method"], r["search_qps_batch"]))
