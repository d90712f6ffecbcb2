"""End to end: a composed config run through the pipeline and recorded in a real MLflow sqlite store,
and real Hydra multiruns of `python -m imgret.run`, read back with MlflowClient."""
import os
import resource
import shlex
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT_ROOT, SYNTHETIC_FAST, write_images
from documented import run_command, run_imgret_here
from imgret.errors import ConfigError, DataUnavailable
from imgret.measure.metrics import RUN_METRICS, RUN_SIZES, recall_at
from imgret.run import run_tracked


def runs_of(tracking_uri: str, experiment: str = "imgret"):
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_run_logs_params_tags_metrics_and_artifacts(make_cfg):
    cfg = make_cfg(*SYNTHETIC_FAST, "method=ivf", "nlist=4", "nprobe=4", "k=10")
    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    metrics = run_tracked(cfg)
    wall_s = time.perf_counter() - started
    client, runs = runs_of(cfg.tracking.uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert set(run.data.metrics) - system == set(RUN_METRICS), "every run's metrics, as the registry declares them"
    # MLflow's system metrics while the stores were extracted: at least the closing sample, however short
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert 0 < run.data.metrics["system/system_memory_usage_megabytes"] < 1e7
    assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    results = {k: v for k, v in run.data.metrics.items() if k not in system}
    assert results == pytest.approx({k: v for k, v in metrics.items() if k not in RUN_SIZES})
    assert run.data.metrics["recall_at_k"] == 1.0  # nprobe = nlist visits every list
    stages = [run.data.metrics[stage] for stage in ("stores_s", "groundtruth_s", "index_s", "search_s")]
    assert 0 < sum(stages) <= wall_s, "the stages lie within the run, as the test's own clock sees it"
    # the timed search holds search.repeats batch calls, each at least as long as the best one
    assert stages[3] >= 3 * 40 / run.data.metrics["search_qps_batch"]
    # the sampled peak is this process's (not a child's): above half its resident set before the run (which can
    # shrink meanwhile: the run collects earlier tests' garbage, and the kernel may drop mapped file pages), and
    # below the kernel's high-water mark of the process
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the kernel counts resident pages per CPU, in batches of max(32, 2 x CPUs): two readings may differ by that
    cpus = os.cpu_count() or 1
    slack = 2 * cpus * max(32, 2 * cpus) * resource.getpagesize()
    assert rss_before * 0.5 <= run.data.metrics["peak_rss_bytes"] <= high_water + slack
    assert (run.data.params["gallery_size"], run.data.params["query_size"], run.data.params["dim"]) == ("200", "40", "512")
    params = run.data.params
    assert params["method.nprobe"] == "4" and params["nlist"] == "4" and params["model.arch"] == "resnet18"
    assert params["k"] == "10" and params["data.name"] == "synthetic"
    tags = run.data.tags
    assert (tags["model"], tags["method"], tags["dataset"]) == ("resnet18", "ivf", "synthetic")
    assert tags["git_commit"] and tags["version.faiss-cpu"] and tags["version.torch"] and tags["cpu"]
    assert tags["embeddings_extracted"] == "gallery,queries"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    found = ("found_ids", "found_scores", "found_similarities", "exact_ids", "exact_scores")
    assert artifacts == {"config.yaml", "results.json", *(f"{name}.npy" for name in found)}
    results = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/results.json")
    assert results["metrics"]["recall_at_k"] == 1.0
    folder = client.download_artifacts(run.info.run_id, "", str(Path(cfg.paths.cache) / "artifacts"))
    arrays = {name: np.load(Path(folder) / f"{name}.npy") for name in found}
    assert arrays["found_ids"].shape == (40, 10) and arrays["found_ids"].dtype == np.int32
    assert np.array_equal(arrays["found_ids"], arrays["exact_ids"])  # nprobe = nlist: exact, so the same ids
    assert recall_at(arrays["found_ids"], arrays["exact_ids"], 10) == run.data.metrics["recall_at_10"]
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"gallery", "queries"}
    assert inputs["gallery"].name == Path(tags["gallery_store"]).name and '"num_rows": 200' in inputs["gallery"].profile
    assert inputs["queries"].digest == Path(tags["query_store"]).name.rsplit("-", 1)[-1]


PEAK_IN_A_TIMED_SECTION = """
import resource

import numpy as np
from imgret.measure.timing import PeakResidentSet, StageTimes

spike = 400 * 2**20
with PeakResidentSet() as memory:
    stages = StageTimes(memory)
    before = memory.peak_bytes
    with stages.measure("search_s"), memory.paused():  # a timed section: no thread samples it
        block = np.ones(spike // 8)
        del block
    with stages.measure("after_s"):
        pass
print(before, memory.peak_bytes, stages.peak_bytes["search_s"], stages.peak_bytes["after_s"],
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_a_peak_within_a_timed_section_counts_in_the_run_and_its_stage_and_the_kernel_keeps_its_own():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PEAK_IN_A_TIMED_SECTION], capture_output=True, text=True,
                          timeout=120, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    before, run_peak, stage_peak, after_peak, high_water = map(int, done.stdout.split())
    spike = 400 * 2**20
    assert run_peak >= before + 0.9 * spike and stage_peak >= before + 0.9 * spike, (before, run_peak, stage_peak)
    assert after_peak < stage_peak - 0.5 * spike, "the next stage's peak is its own"
    assert high_water >= run_peak, "the kernel's peak of the process is read, never reset"


def test_another_architecture_is_named_by_its_architecture(make_cfg):
    cfg = make_cfg(*SYNTHETIC_FAST, "model.arch=efficientnet_b0", "method=flat", "k=10")
    run_tracked(cfg)
    _, runs = runs_of(cfg.tracking.uri)
    run = runs[0]
    assert run.data.tags["model"] == "efficientnet_b0" and run.info.run_name.startswith("efficientnet_b0-flat")
    assert run.data.params["model.name"] == "efficientnet_b0"
    assert Path(run.data.tags["gallery_store"]).name.startswith("efficientnet_b0-synthetic-gallery-")
    assert make_cfg("model=mobilenet").model.name == "mobilenet"  # a config's own architecture keeps its short name
    assert make_cfg("model=clip", "model.arch=ViT-B-16").model.name == "ViT-B-16"


def test_every_data_config_runs_with_its_defaults(make_cfg):
    """data=synthetic with nothing else: the top-level nlist follows what the data config suggests."""
    cfg = make_cfg("data=synthetic", "model.pretrained=false", "model.image_size=32")
    assert cfg.nlist == 16 and cfg.method.nlist == 16
    assert run_tracked(cfg)["recall_at_10"] > 0
    assert make_cfg("data=tiny_imagenet").nlist == 256  # the seed's value everywhere else


def test_a_config_error_is_raised_before_any_run_exists(make_cfg, tmp_path):
    cfg = make_cfg(*SYNTHETIC_FAST, "method=ivf", "nlist=4", "nprobe=5")
    with pytest.raises(ConfigError, match="^nprobe=5: a whole number from 1 to nlist \\(4\\)$"):
        run_tracked(cfg)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "cache" / "embeddings").exists()


def test_a_run_that_fails_after_it_started_is_marked_failed_with_its_error(make_cfg, tmp_path):
    images = tmp_path / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            (images / cls / f"{i}.jpg").write_bytes(b"")  # every image unusable: found only while extracting
    cfg = make_cfg("data=folder", f"data.gallery_dir={images}", "model.pretrained=false", "model.image_size=32",
                   "method=flat", "k=1")
    with pytest.raises(DataUnavailable, match="none of the .* could be read"):
        run_tracked(cfg)
    _, runs = runs_of(cfg.tracking.uri)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"].startswith("DataUnavailable: none of the")


def imgret_multirun(tmp_path, *overrides, data=SYNTHETIC_FAST, in_process=True):
    """`python -m imgret.run -m ...` through its entry point in this process (tests/documented.py says why), or
    in a process of its own where the process's end matters (a failed sweep's parent is closed at exit)."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    words = [
        "-m", *data,
        f"paths.cache={tmp_path / 'cache'}", f"tracking.uri={uri}",
        f"tracking.artifact_root={tmp_path / 'mlruns' / 'artifacts'}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "extract.progress=false", "search.latency_queries=50", "extract.latency_images=4", "num_workers=0",
        *overrides,
    ]
    command = "python -m imgret.run " + " ".join(shlex.quote(w) for w in words)
    if not in_process:
        return run_command(command, PROJECT_ROOT, in_process=False, check=False), uri
    return run_imgret_here(command, PROJECT_ROOT), uri


def children_of_the_parent(uri):
    _, runs = runs_of(uri)
    parents = [r for r in runs if r.data.tags.get("imgret.role") == "multirun"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1, "every job's run hangs under the parent"
    return parent, children


def test_hydra_multirun_groups_jobs_under_a_parent_and_extracts_once(tmp_path):
    result, uri = imgret_multirun(tmp_path, "model=resnet18", "method=brute,flat,ivf", "nlist=4", "nprobe=1,4")
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = children_of_the_parent(uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "6"
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}
    extracted = [c.data.tags["embeddings_extracted"] for c in children]
    assert extracted.count("gallery,queries") == 1 and extracted.count("none") == 5
    by_setting = {(c.data.tags["method"], c.data.params["nprobe"]): c.data.metrics["recall_at_10"] for c in children}
    assert by_setting[("brute", "1")] == by_setting[("flat", "1")] == by_setting[("ivf", "4")] == 1.0
    built = {c.data.params["nprobe"]: c.data.tags["index_built"] for c in children if c.data.tags["method"] == "ivf"}
    assert built == {"1": "true", "4": "false"}, "the IVF index is built by the first job and loaded by the next"
    assert {c.data.metrics["extract_ms_per_image"] for c in children} == {children[0].data.metrics["extract_ms_per_image"]}


def test_a_sweep_point_whose_settings_do_not_reach_its_method_runs_once(tmp_path):
    """nprobe means nothing to flat: flat runs once, its second point links to that run; IVF runs both."""
    result, uri = imgret_multirun(tmp_path, "method=flat,ivf", "nlist=4", "nprobe=1,4", "k=10")
    assert result.returncode == 0, result.stderr[-3000:]
    _, children = children_of_the_parent(uri)
    client, _ = runs_of(uri)
    flat = [c for c in children if c.data.tags["method"] == "flat"]
    ivf = [c for c in children if c.data.tags["method"] == "ivf"]
    assert len(flat) == 2 and len(ivf) == 2
    originals = [c for c in flat if "imgret.reused_run_id" not in c.data.tags]
    assert len(originals) == 1 and [c.data.tags.get("imgret.reused_run_id") for c in flat if c not in originals] == \
        [originals[0].info.run_id]
    assert all("imgret.reused_run_id" not in c.data.tags for c in ivf)
    assert sorted(c.data.params["nprobe"] for c in flat) == ["1", "4"]  # each point keeps its own settings
    assert sorted(next(o for o in c.data.tags["overrides"].split() if o.startswith("nprobe=")) for c in flat) == \
        ["nprobe=1", "nprobe=4"]
    experiment = client.get_experiment(children[0].info.experiment_id)
    assert "recall@k against the exact ground truth" in experiment.tags["mlflow.note.content"]


def test_a_failed_job_is_marked_failed_and_the_multirun_goes_on(tmp_path):
    # The first folder's images are all unusable, which only extraction finds out: that job fails at run time.
    unusable, good = tmp_path / "unusable", tmp_path / "good"
    for cls in ("a", "b"):
        (unusable / cls).mkdir(parents=True)
        for i in range(4):
            (unusable / cls / f"{i}.jpg").write_bytes(b"")
    write_images(good, per_class=6)
    result, uri = imgret_multirun(tmp_path, f"data.gallery_dir={unusable},{good}", "method=flat,ivf", "nlist=2", "nprobe=1", "k=2",
                                  data=("data=folder", "model.pretrained=false", "model.image_size=32"), in_process=False)
    assert result.returncode != 0, "Hydra reports the failure once all jobs ran"
    parent, children = children_of_the_parent(uri)
    statuses = [(c.data.params["data.gallery_dir"], c.data.tags["method"], c.info.status) for c in children]
    assert statuses == [(str(unusable), "flat", "FAILED"), (str(unusable), "ivf", "FAILED"),
                        (str(good), "flat", "FINISHED"), (str(good), "ivf", "FINISHED")]
    assert "none of the" in children[0].data.tags["error"]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"] == "2" and parent.data.tags["jobs"] == "4"


def test_a_sweep_with_a_bad_point_is_refused_before_its_first_job(tmp_path):
    result, uri = imgret_multirun(tmp_path, "method=ivf", "nlist=4", "nprobe=2,64")
    assert result.returncode == 2
    assert "config error: nprobe=64: a whole number from 1 to nlist (4) (in the sweep point" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() and not (tmp_path / "cache" / "embeddings").exists()


def test_unknown_model_is_refused_before_any_job_with_the_options(tmp_path):
    result, _ = imgret_multirun(tmp_path, "model=resnet18,vgg99")
    assert result.returncode != 0
    assert "vgg99" in result.stderr and "resnet18" in result.stderr and "clip" in result.stderr
    assert not (tmp_path / "cache").exists(), "nothing may run before the whole sweep composes"
