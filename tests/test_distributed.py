"""Beyond one process: a real 2-process DDP extraction (gloo, on the CPU) against a 1-process one, a torchrun
launch, parallel sweeps through Hydra's joblib launcher, an Optuna search, and the Slurm preset."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, PROJECT_ROOT
from imgret.embed.options import ExtractSettings
from imgret.sources.registry import load_splits
from imgret.embed.extract import ensure_embeddings
from imgret.embed.store import EmbeddingStore
from documented import documented, run_command, smaller
from test_faults import all_runs, imgret_command, sqlite_uri

SMALL = ("data=synthetic", "model.pretrained=false", "model.image_size=32", "data.num_classes=5",
         "data.gallery_per_class=13", "data.query_per_class=3", "batch_size=4")


def run_small(tmp_path: Path, command: str, replacements: dict[str, str] | None = None, *extra: str):
    """A documented command in real processes, at SMALL's size, with its caches and runs under tmp_path."""
    folders = imgret_command(tmp_path)[3:]
    return run_command(smaller(command, replacements, (*folders, *SMALL, *extra)), PROJECT_ROOT, in_process=False,
                       check=False)


def assert_same_store(store: EmbeddingStore, reference: EmbeddingStore) -> None:
    assert store.path.name == reference.path.name, "the same key: DDP does not change the vectors"
    assert store.paths == reference.paths and store.labels.tolist() == reference.labels.tolist()
    assert len(store) == len(reference) == len(store.vectors)
    assert np.abs(np.asarray(store.vectors) - np.asarray(reference.vectors)).max() < 1e-5


@pytest.mark.slow
def test_two_process_ddp_extraction_gives_the_store_one_process_gives(make_cfg, tmp_path):
    # 65 gallery images over 2 ranks with batch 4: the sampler pads one rank with a repeat, which must vanish
    result = run_small(tmp_path / "ddp", documented("python -m imgret.run data=synthetic model.pretrained=false model.image_size=64 nlist=16 extract.devices=2 extract.strategy=ddp"),
                       None, "method=flat")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    runs = all_runs(sqlite_uri(tmp_path / "ddp"))
    assert [r.info.status for r in runs] == ["FINISHED"], "one run: rank 1 extracts, it does not track"
    gallery = EmbeddingStore.open(Path(runs[0].data.tags["gallery_store"]))
    queries = EmbeddingStore.open(Path(runs[0].data.tags["query_store"]))
    assert gallery.meta["extraction"]["processes"] == 2 and len(gallery) == 65

    cfg = make_cfg(*SMALL)
    one_process = ensure_embeddings(load_splits(cfg.data, cfg.seed), ExtractSettings.from_config(cfg))
    assert_same_store(gallery, one_process.gallery)
    assert_same_store(queries, one_process.queries)


@pytest.mark.slow
def test_torchrun_starts_every_rank_and_only_rank_0_tracks(make_cfg, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    from imgret.embed.ranks import free_port

    # one node of the README's two, two processes of its four; the same c10d rendezvous, on loopback
    one_node = {"--nnodes=2": "--nnodes=1", "--nproc-per-node=4": "--nproc-per-node=2",
                "HOST:29500": f"127.0.0.1:{free_port()}", "extract.devices=4": "extract.devices=2",
                "extract.num_nodes=2": "extract.num_nodes=1", "torchrun ": f"{torchrun} "}
    result = run_small(tmp_path, documented("torchrun --nnodes=2 --nproc-per-node=4"), one_node, "method=flat")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(sqlite_uri(tmp_path))
    assert [r.info.status for r in runs] == ["FINISHED"]
    cfg = make_cfg(*SMALL)
    reference = ensure_embeddings(load_splits(cfg.data, cfg.seed), ExtractSettings.from_config(cfg))
    assert_same_store(EmbeddingStore.open(Path(runs[0].data.tags["gallery_store"])), reference.gallery)


@pytest.mark.slow
def test_a_joblib_sweep_runs_jobs_in_parallel_extracts_once_and_counts_its_jobs(tmp_path):
    result = run_small(tmp_path, documented("method=flat,ivf nlist=16 nprobe=1,4 hydra/launcher=joblib"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    runs = all_runs(sqlite_uri(tmp_path))
    parent = next(r for r in runs if r.data.tags.get("imgret.role") == "multirun")
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "4" and parent.data.tags["failed_jobs"] == "0"
    assert len(children) == 4 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    # every child names the process that made it, a link too (flat's second nprobe, when its twin finished first)
    assert len({c.data.tags["imgret.pid"] for c in children}) >= 2, "jobs ran in more than one process"
    extracted = [c.data.tags["embeddings_extracted"] for c in children]
    assert extracted.count("gallery,queries") == 1 and extracted.count("none") == 3, extracted


@pytest.mark.slow
def test_an_optuna_search_over_nlist_and_nprobe_optimises_what_main_returns(tmp_path):
    result = run_small(tmp_path, documented("+experiment=optuna_ivf"), {"n_trials=6": "n_trials=4"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(sqlite_uri(tmp_path))
    parent = next(r for r in runs if r.data.tags.get("imgret.role") == "multirun")
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and len(children) >= 1
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    best = results["solutions"] if "solutions" in results else [results]
    measured = {(c.data.params["nlist"], c.data.params["nprobe"]): (c.data.metrics["recall_at_10"],
                                                                   c.data.metrics["search_qps_batch"]) for c in children}
    for solution in best:  # Optuna's best trials carry the values the runs logged
        point = (str(solution["params"]["nlist"]), str(solution["params"]["nprobe"]))
        assert tuple(solution["values"]) == pytest.approx(measured[point])


def test_the_slurm_preset_composes_onto_submitit(tmp_path):
    command = documented("python -m imgret.run -m hydra/launcher=slurm hydra.launcher.partition=gpu")
    sweep = command.split("imgret.run -m ", 1)[1].split()
    assert sweep[:2] == ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]  # the rest is the sweep's axes
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=sweep[:2], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == ("gpu", 1, 1, 240)


def test_main_returns_the_objectives_a_sweeper_optimises():
    from imgret.run import objective_values

    metrics = {"recall_at_10": 0.9, "search_qps_batch": 1000.0}
    assert objective_values(metrics, ["recall_at_10"]) == 0.9
    assert objective_values(metrics, ["recall_at_10", "search_qps_batch"]) == (0.9, 1000.0)
    assert np.isnan(objective_values({}, ["recall_at_10"])), "a skipped point has no value"


@pytest.mark.parametrize("override, key", [("extract.devices=0", "extract.devices=0"),
                                           ("extract.precision=fp8", "extract.precision=fp8"),
                                           ("extract.precision=16-mixed", "extract.precision=16-mixed"),
                                           ("extract.strategy=warp", "extract.strategy=warp"),
                                           ("objectives=[recall]", "objectives=")])
def test_bad_distributed_settings_are_refused_before_any_work(make_cfg, tmp_path, override, key):
    from imgret.errors import ConfigError
    from imgret.run import run_tracked

    with pytest.raises(ConfigError) as error:
        run_tracked(make_cfg(*SMALL, override))
    assert str(error.value).startswith(key)
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_bf16_precision_changes_the_store_key_and_stays_close(make_cfg):
    cfg32 = make_cfg(*SMALL, "extract.precision=32-true")  # not auto: that is bf16 on a CPU with avx512_bf16
    cfg16 = make_cfg(*SMALL, "extract.precision=bf16-mixed")
    fp32 = ensure_embeddings(load_splits(cfg32.data, cfg32.seed), ExtractSettings.from_config(cfg32)).gallery
    bf16 = ensure_embeddings(load_splits(cfg16.data, cfg16.seed), ExtractSettings.from_config(cfg16)).gallery
    assert bf16.path != fp32.path and bf16.meta["extraction"]["precision"] == "bf16-mixed"
    cosine = (np.asarray(bf16.vectors) * np.asarray(fp32.vectors)).sum(axis=1)
    assert cosine.min() > 0.98 and not np.array_equal(np.asarray(bf16.vectors), np.asarray(fp32.vectors))
