"""imgret through a real single-node Slurm, started by the documented script (tools/slurm_single_node.py) and
stopped by the pids it recorded: a sweep with hydra/launcher=slurm runs each point as a Slurm job and every result
reaches MLflow under one parent; a job cancelled with scancel is KILLED in MLflow and the rerun resumes it; a job of
two tasks extracts the store that one process extracts. Where Slurm cannot start, the tests skip and say why."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from documented import PROJECT_ROOT, documented, environment, sandbox, smaller

pytestmark = pytest.mark.slow
sys.path.insert(0, str(PROJECT_ROOT / "tools"))
import slurm_single_node  # noqa: E402

FOLDER = "/tmp/imgret-slurm"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_single_node.missing()
    if why:
        pytest.skip(f"Slurm cannot start here: {why}")
    folder = tmp_path_factory.mktemp("slurm")
    start = smaller(documented("python tools/slurm_single_node.py start /tmp/imgret-slurm"), {FOLDER: str(folder)})
    printed = subprocess.run(start, shell=True, cwd=PROJECT_ROOT, env=environment(), capture_output=True, text=True,
                             timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    export = documented("export SLURM_CONF=/tmp/imgret-slurm/slurm.conf").replace(FOLDER, str(folder))
    assert printed.stdout.strip() == export  # what the script prints is the documented line
    pids = json.loads((folder / "daemons.json").read_text())["pids"]
    try:
        yield environment({"SLURM_CONF": str(folder / "slurm.conf")})
    finally:
        stop = smaller(documented("python tools/slurm_single_node.py stop /tmp/imgret-slurm"), {FOLDER: str(folder)})
        subprocess.run(stop, shell=True, cwd=PROJECT_ROOT, env=environment(), timeout=120, check=True)
        left = [name for name, pid in pids.items() if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"Slurm daemons outlived the tests: {left}"


def runs_in(work: Path) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["imgret"], output_format="list")


def run(command: str, work: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_daemons_listen_on_the_loopback_only(slurm):
    pids = json.loads((Path(slurm["SLURM_CONF"]).parent / "daemons.json").read_text())["pids"]
    listening = {(name, connection.laddr.ip, connection.laddr.port) for name, pid in pids.items()
                 for connection in psutil.Process(pid).net_connections("inet")
                 if connection.status == psutil.CONN_LISTEN}
    assert {name for name, _, _ in listening} == {"slurmctld", "slurmd"}, listening
    assert {ip for _, ip, _ in listening} == {"127.0.0.1"}, listening


def test_a_sweep_runs_each_point_as_a_slurm_job_under_one_parent(slurm, tmp_path):
    work = sandbox(tmp_path)
    done = run(documented("-m hydra/launcher=slurm hydra.launcher.partition=debug hydra.launcher.gpus_per_node=0"),
               work, slurm)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = runs_in(work)
    parents = [r for r in runs if r.data.tags.get("imgret.role") == "multirun"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    jobs = {r.data.tags.get("slurm_array_job_id") for r in children}
    tasks = sorted(r.data.tags.get("slurm_array_task_id") for r in children)
    assert len(jobs) == 1 and None not in jobs and tasks == ["0", "1"], "one Slurm array, a task per point"


def test_a_cancelled_job_is_killed_in_mlflow_and_the_rerun_resumes_it(slurm, tmp_path):
    work = sandbox(tmp_path)
    sweep = smaller(documented("-m hydra/launcher=slurm hydra.launcher.partition=debug hydra.launcher.gpus_per_node=0"),
                    {"method=flat,ivf": "method=flat", "model.image_size=64": "model.image_size=160"},
                    ("data.gallery_per_class=60", "batch_size=8", "threads=1"))
    first = subprocess.Popen(shlex.split(sweep), cwd=work, env=slurm, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # no shell between: terminate() reaches imgret
    staged = work / ".cache" / "imgret" / "embeddings"
    deadline = time.monotonic() + 300
    written = lambda: any(part.stat().st_size > 0 for part in staged.rglob("part-*"))  # noqa: E731
    while time.monotonic() < deadline and not written():  # some rows of the gallery written
        time.sleep(1)
    assert written(), "the job never began writing its store"
    jobs = subprocess.run(["squeue", "--noheader", "--format=%i"], env=slurm, capture_output=True, text=True).stdout.split()
    assert len(jobs) == 1, jobs
    subprocess.run(["scancel", jobs[0]], env=slurm, check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        points = [r for r in runs_in(work) if r.data.tags.get("imgret.role") != "multirun"]
        if [r.info.status for r in points] == ["KILLED"]:
            break
        time.sleep(1)
    assert [r.info.status for r in points] == ["KILLED"], "the cancelled job's run is not KILLED"
    first.terminate()  # submitit, without accounting, may keep polling a cancelled job: the sweep is stopped
    printed = first.communicate(timeout=120)[0]
    assert first.returncode != 0, printed[-2000:]

    again = run(sweep, work, slurm, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    finished = [r for r in runs_in(work) if r.info.status == "FINISHED" and r.data.tags.get("imgret.role") != "multirun"]
    assert len(finished) == 1 and "gallery" in finished[0].data.tags["embeddings_extracted"]
    gallery = json.loads(next(staged.glob("*-gallery-*/meta.json")).read_text())
    assert gallery["extraction"]["resumed_rows"] > 0, "the rerun extracted only what the cancelled job had not"


def test_a_two_task_job_extracts_the_store_one_process_extracts(slurm, tmp_path):
    two = sandbox(tmp_path / "two")
    done = run(documented("srun --ntasks-per-node=2 --cpus-per-task=1 python -m imgret.run"), two, slurm)
    assert done.returncode == 0, done.stderr[-3000:]
    one = sandbox(tmp_path / "one")
    alone = documented("srun --ntasks-per-node=2 --cpus-per-task=1 python -m imgret.run").split(" ", 3)[3]
    done = run(smaller(alone, {"extract.devices=2 extract.strategy=ddp": "extract.devices=1"}), one, environment())
    assert done.returncode == 0, done.stderr[-3000:]
    stores = [sorted(p for p in (work / ".cache" / "imgret" / "embeddings").glob("*-gallery-*") if p.is_dir())
              for work in (two, one)]
    assert len(stores[0]) == len(stores[1]) == 1
    two_rows, one_rows = (np.load(found[0] / "vectors.npy") for found in stores)
    assert two_rows.shape == one_rows.shape
    assert np.allclose(two_rows, one_rows, atol=1e-5)  # the same images in the same order, the same rows
    assert len(runs_in(two)) == 1, "rank 0 alone tracks the run"
