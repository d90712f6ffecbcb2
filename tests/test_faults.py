"""Nothing lost, nothing silent: bad configuration, bad images, damaged caches and tracking stores, killed and
concurrent processes, and a tracking server that goes away. Real processes, files, sqlite stores and an
`mlflow server` on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

import imgret.track.runs
import imgret.track.store
from documented import documented, run_command, smaller
from conftest import PROJECT_ROOT, SYNTHETIC_FAST, write_images
from imgret.sources.decode import open_image
from imgret.errors import BadImage, ConfigError, TrackingRefused, TrackingUnavailable
from imgret.run import point_record, run_tracked
from imgret.track.store import TrackingSettings

PYTHON = sys.executable


def imgret_command(tmp_path: Path, *overrides: str, multirun: bool = False, uri: str | None = None) -> list[str]:
    uri = uri or f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    return [PYTHON, "-m", "imgret.run", *(["-m"] if multirun else []), f"paths.cache={tmp_path / 'cache'}",
            f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'multirun'}", f"hydra.run.dir={tmp_path / 'run'}",
            "extract.progress=false", "search.latency_queries=50", "extract.latency_images=4", "num_workers=0",
            "extract.backend=torch",
            *overrides]


def run_imgret(tmp_path, *overrides, multirun=False, uri=None, timeout=600, env=None):
    return subprocess.run(imgret_command(tmp_path, *overrides, multirun=multirun, uri=uri), cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def all_runs(uri: str) -> list:
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("imgret")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []


def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


# --------------------------------------------------------------------------- bad configuration


def not_a_zip(tmp_path):
    path = tmp_path / "tiny-imagenet-200.zip"
    path.write_bytes(b"this is not a zip archive")
    return path


BAD_VALUES = [  # (overrides, the key the one line must name)
    (["k=0"], "k=0"),
    (["batch_size=0"], "batch_size=0"),
    (["method=ivfpq", "method.pq_m=7"], "method.pq_m=7"),
    (["method=factory", "method.index_factory='IVF16,PQ7'"], "method.index_factory=IVF16,PQ7"),
    (["method=factory", "method.index_factory='IVF16,Flat'", "method.search_params='nonsense=3'"],
     "method.search_params=nonsense=3"),
    (["method=brute", "method.query_chunk=0"], "method.query_chunk=0"),
    (["method=hnswlib", "level=12"], "level=12"),
    (["method=annoy", "method.search_k=0"], "method.search_k=0"),
    (["method=ngt", "method.epsilon=-2"], "method.epsilon=-2"),
    (["search.latency_queries=abc"], "search.latency_queries=abc"),
    (["search.latency_queries=0"], "search.latency_queries=0"),
    (["search.warmup_queries=-1"], "search.warmup_queries=-1"),
    (["search.tie_epsilon=-1"], "search.tie_epsilon=-1"),
    (["cost.core_hour_usd=-0.03"], "cost.core_hour_usd=-0.03"),
    (["cost.disk_gib_month_usd=free"], "cost.disk_gib_month_usd=free"),
    (["extract.latency_images=0"], "extract.latency_images=0"),
    (["device=tpu"], "device=tpu"),
    (["nprobe=abc"], "nprobe=abc"),
    (["seed=abc"], "seed=abc"),
    (["threads=0"], "threads=0"),
    (["num_workers=-1"], "num_workers=-1"),
    (["data.on_bad_image=maybe"], "data.on_bad_image=maybe"),
    (["data.max_image_pixels=0"], "data.max_image_pixels=0"),
    (["model.image_size=8"], "model.image_size=8"),
    (["model=resnet18", "model.arch=resnet999"], "model.arch=resnet999"),
    (["tracking.uri=mysql://nowhere"], "tracking.uri=mysql://nowhere"),
    (["tracking.system_metrics_s=0"], "tracking.system_metrics_s=0"),
    (["paths.cache={file}/cache"], "paths.cache="),
    (["data=tiny_imagenet", "data.archive={not_a_zip}", "data.checksums=[sha256:{digest}]"], "data.archive="),
]


@pytest.mark.parametrize("overrides, key", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_every_bad_value_is_refused_before_any_work_naming_the_key(make_cfg, tmp_path, overrides, key):
    import hashlib

    archive = not_a_zip(tmp_path)
    (tmp_path / "a-file").write_text("")
    values = {"file": tmp_path / "a-file", "not_a_zip": archive,
              "digest": hashlib.sha256(archive.read_bytes()).hexdigest()}
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=synthetic"]
    cfg = make_cfg(*data, "model.pretrained=false", "model.image_size=32", "nlist=4", "nprobe=2",
                   *[o.format(**values) for o in overrides])
    with pytest.raises(ConfigError) as error:
        run_tracked(cfg)
    assert str(error.value).startswith(key) and ": " in str(error.value)
    assert not (tmp_path / "mlruns" / "mlflow.db").exists(), "no run, not even a tracking store"
    assert not (tmp_path / "cache" / "embeddings").exists() and not (tmp_path / "cache" / "data").exists()


@pytest.mark.parametrize("overrides, key", [
    (["k=0"], "k=0"), (["batch_size=0"], "batch_size=0"), (["method=ivfpq", "method.pq_m=7"], "method.pq_m=7"),
    # a level past the method's rungs, or not a number: refused before its knob's interpolation is read
    (["method=ivf", "level=999"], "level=999"), (["method=ivf", "level=abc"], "level=abc"),
    (["method=pgvector_ivfflat", "level=999"], "level=999"),
    # Hydra's own refusals of the command line, said in one line: an unknown group option, a key the method has not
    (["method=nosuchmethod"], "method=nosuchmethod"), (["method=flat", "method.refine_factor=-5"],
                                                       "method.refine_factor=-5"),
    (["+experiment=nope"], "+experiment=nope"),
    # trained weights neither installed nor in the hub's cache, offline: refused before a run opens
    (["model=resnet18", "model.pretrained=true"], "model.pretrained=true"),
])
def test_a_bad_value_exits_2_with_one_line_and_no_run(tmp_path, overrides, key):
    result = run_imgret(tmp_path, *SYNTHETIC_FAST, "nlist=4", "nprobe=2", *overrides, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"config error: {key}: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


@pytest.mark.slow
def test_a_sweep_with_an_unknown_option_exits_2_with_one_line_before_any_job(tmp_path):
    result = run_imgret(tmp_path, *SYNTHETIC_FAST, "nlist=4", "nprobe=2", "method=flat,nosuch", multirun=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("config error: method=nosuch: one of annoy, binary, brute, ")
    assert "Traceback" not in result.stderr and "Available options" not in result.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() and not (tmp_path / "cache").exists()


def test_a_dead_tracking_server_is_reported_within_15_s(tmp_path):
    start = time.monotonic()
    result = run_imgret(tmp_path, *SYNTHETIC_FAST, uri="http://127.0.0.1:9")
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and elapsed < 15, (elapsed, result.stderr[-500:])
    assert result.stderr.strip().splitlines()[-1].startswith("config error: tracking.uri=http://127.0.0.1:9: ")
    assert not (tmp_path / "cache" / "embeddings").exists()


# --------------------------------------------------------------------------- bad images


def test_unusual_and_broken_image_files(tmp_path):
    sixteen = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(sixteen)  # mid-grey at 16 bits
    assert Image.open(sixteen).mode.startswith("I")
    assert np.asarray(open_image(str(sixteen))).mean() == pytest.approx(128, abs=1), "scaled, not clipped to white"
    rgba = tmp_path / "transparent.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(rgba)
    assert np.asarray(open_image(str(rgba))).min() == 255, "transparent pixels over white"

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 million pixels in a small file
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(BadImage, match="20000x20000 pixels is over data.max_image_pixels=89478485"):
        open_image(str(bomb))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImage, match="empty.jpg: UnidentifiedImageError"):
        open_image(str(empty))
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    with pytest.raises(BadImage, match="text.jpg: UnidentifiedImageError"):
        open_image(str(text))


def test_a_folder_with_a_truncated_and_an_empty_jpeg_finishes_with_bad_images_2(make_cfg, tmp_path):
    images = write_images(tmp_path / "images", per_class=8)
    jpeg = tmp_path / "real.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg, quality=90)
    (images / "a" / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (images / "b" / "empty.jpg").write_bytes(b"")
    cfg = make_cfg("data=folder", f"data.gallery_dir={images}", "data.query_fraction=0.2", "model.pretrained=false",
                   "model.image_size=32", "method=flat", "k=3")
    metrics = run_tracked(cfg)
    assert metrics["bad_images"] == 2
    run = all_runs(cfg.tracking.uri)[0]
    assert run.info.status == "FINISHED" and run.data.metrics["bad_images"] == 2
    listed = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/bad_images.txt").splitlines()
    assert sorted(line.split("\t")[2] for line in listed) == sorted(
        [str(images / "a" / "truncated.jpg"), str(images / "b" / "empty.jpg")])
    assert metrics["gallery_size"] + metrics["query_size"] == 2 * 8  # 18 files, 2 unusable


# --------------------------------------------------------------------------- damaged caches


@pytest.mark.parametrize("damage", ["truncate vectors", "random bytes in vectors", "delete meta.json"])
def test_a_damaged_embedding_store_is_moved_aside_and_extracted_again(make_cfg, tmp_path, damage):
    cfg = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=6", "data.query_per_class=2", "method=flat", "k=10")
    first = run_tracked(cfg)
    store = next(p for p in (tmp_path / "cache" / "embeddings").iterdir() if "-gallery-" in p.name and
                 not p.name.startswith(".") and p.is_dir())  # not the store's .lock file beside it
    vectors = store / "vectors.npy"
    if damage == "truncate vectors":
        vectors.write_bytes(vectors.read_bytes()[:-1000])
    elif damage == "random bytes in vectors":
        data = bytearray(vectors.read_bytes())
        data[500:532] = np.random.default_rng(0).bytes(32)
        vectors.write_bytes(data)
    else:
        (store / "meta.json").unlink()
    second = run_tracked(cfg)
    runs = all_runs(cfg.tracking.uri)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert runs[1].data.tags["embeddings_extracted"] == "gallery"
    assert second["recall_at_10"] == first["recall_at_10"] and second["precision_at_10"] == first["precision_at_10"]
    assert [p.name.split(".")[0] for p in (store.parent / ".damaged").iterdir()] == [store.name]


# --------------------------------------------------------------------------- the tracking store


def test_a_store_broken_by_an_interrupted_creation_is_made_again(make_cfg, tmp_path):
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as connection:  # what a kill during table creation leaves: some tables, no runs
        connection.execute("create table experiments (experiment_id integer primary key, name varchar(256))")
        connection.execute("create table _alembic_tmp_params (key varchar(250))")
    imgret.track.store._open.cache_clear()
    cfg = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=3", "data.query_per_class=1", "method=flat", "k=2")
    run_tracked(cfg)
    assert [r.info.status for r in all_runs(cfg.tracking.uri)] == ["FINISHED"]
    assert len(list(db.parent.glob("mlflow.db.broken-*"))) == 1


def test_a_damaged_store_with_runs_is_reported_with_its_path_and_what_to_do(make_cfg, tmp_path):
    cfg = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=3", "data.query_per_class=1", "method=flat", "k=2")
    run_tracked(cfg)
    db = tmp_path / "mlruns" / "mlflow.db"
    with sqlite3.connect(db) as connection:  # an interrupted upgrade: the schema and its version disagree
        connection.execute("update alembic_version set version_num = '0000000000'")
    imgret.track.store._open.cache_clear()
    mlflow.tracking._tracking_service.utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    with pytest.raises(TrackingUnavailable, match=rf"{db} cannot be opened .* holds 3 experiments and runs: back it "
                                                  r"up, then run `mlflow db upgrade sqlite:///"):
        run_tracked(cfg)
    assert db.is_file() and not list(db.parent.glob("mlflow.db.broken-*"))


def healthy_store_without_runs(tmp_path) -> tuple[Path, str]:
    """A store MLflow made, holding one experiment of a user's and no run."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    uri = f"sqlite:///{db}"
    MlflowClient(uri).create_experiment("someone-elses")
    mlflow.tracking._tracking_service.utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    imgret.track.store._open.cache_clear()
    return db, uri


@pytest.mark.slow  # MLflow waits out sqlite's busy timeout several times before it gives up on the lock
def test_a_store_with_an_experiment_and_no_runs_is_never_moved_aside(tmp_path):
    """Opened while another process holds it locked, it cannot be read: that is said, and nothing is moved (an
    earlier imgret moved any store without runs aside on any error)."""
    db, uri = healthy_store_without_runs(tmp_path)
    locker = sqlite3.connect(db, timeout=0)
    locker.execute("begin exclusive")
    try:
        with pytest.raises(TrackingUnavailable, match="nothing was moved"):
            imgret.track.store.open_tracking(TrackingSettings(uri, "imgret"))
    finally:
        locker.rollback()
        locker.close()
    assert not list(db.parent.glob("mlflow.db.broken-*"))
    mlflow.tracking._tracking_service.utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    imgret.track.store._open.cache_clear()
    imgret.track.store.open_tracking(TrackingSettings(uri, "imgret"))
    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {"someone-elses", "imgret"} <= names, "the same store, opened once it was free"


def test_a_deleted_experiment_is_refused_not_moved_aside_or_logged_into(tmp_path):
    db, uri = healthy_store_without_runs(tmp_path)
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("imgret"))
    with pytest.raises(TrackingRefused, match=r"tracking.experiment=imgret: this experiment is deleted .*\(`mlflow "
                                              r"experiments restore --experiment-id"):
        imgret.track.store.open_tracking(TrackingSettings(uri, "imgret"))
    assert not list(db.parent.glob("mlflow.db.broken-*")) and not client.search_runs(["1", "2"])


def test_a_value_the_store_refuses_fails_the_run_and_is_not_taken_for_a_lost_server(make_cfg, tmp_path):
    """MLflow refuses to change a logged parameter: the run fails with that message; nothing is kept 'for later'."""
    cfg = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=3", "data.query_per_class=1", "method=flat", "k=2")
    experiment_id = imgret.track.store.open_tracking(TrackingSettings.of(cfg.tracking))
    with pytest.raises(TrackingRefused, match="the tracking store refused log_batch .*Changing param values"):
        with imgret.track.runs.tracked_run(point_record(cfg), experiment_id) as recorder:
            recorder.log_params({"k": "3"})  # logged as 2 already
    assert recorder.lost is None
    [run] = all_runs(cfg.tracking.uri)
    assert run.info.status == "FAILED" and "TrackingRefused" in run.data.tags["error"]
    assert not (recorder.folder / imgret.track.runs.RECORD).exists()


def test_a_refused_connection_is_a_lost_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = MlflowClient(f"http://127.0.0.1:{free_port()}")
    recorder = imgret.track.runs.RunRecorder(dead, "0" * 32, tmp_path / "run", {})
    recorder.set_tags({"a": "b"})
    assert recorder.lost and "API request to" in recorder.lost
    recorder.set_tags({"c": "d"})  # nothing more is sent; everything stays in the folder
    assert recorder.record["tags"] == {"a": "b", "c": "d"}


@pytest.mark.slow
def test_three_sweeps_started_at_once_on_a_new_store_keep_every_run(tmp_path):
    sweeps = [("model=resnet18", "k=5"), ("model=mobilenet", "k=5"), ("model=resnet18", "k=4")]
    processes = [subprocess.Popen(
        imgret_command(tmp_path, *SYNTHETIC_FAST, *sweep, "method=flat,ivf", "nlist=4", "nprobe=1,4",
                       f"hydra.sweep.dir={tmp_path / f'multirun-{i}'}", multirun=True),
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i, sweep in enumerate(sweeps)]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [e[-2000:] for e in errors]
    runs = all_runs(sqlite_uri(tmp_path))
    parents = [r for r in runs if r.data.tags.get("imgret.role") == "multirun"]
    children = [r for r in runs if r.data.tags.get("imgret.role") != "multirun"]
    assert len(parents) == 3 and len(children) == 12
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {p.data.tags["jobs"] for p in parents} == {"4"}
    # resnet18's store was extracted once although two sweeps needed it at the same moment (links, one per
    # sweep for flat's second nprobe, repeat their original's tags: count the runs that ran)
    ran = [c for c in children if "imgret.reused_run_id" not in c.data.tags]
    assert len(ran) == 9
    extracted = [c.data.tags["embeddings_extracted"] for c in ran if c.data.tags["model"] == "resnet18"]
    # each split under its own lock: one run may extract both, or two runs one each, never one twice
    splits = [split for tag in extracted if tag != "none" for split in tag.split(",")]
    assert sorted(splits) == ["gallery", "queries"], extracted
    assert not list((tmp_path / "mlruns").glob("*.broken-*"))


# --------------------------------------------------------------------------- kill, interrupt, resume


def wait_for_rows(cache: Path, rows: int, timeout: float = 120) -> None:
    """Until a running extraction has written `rows` rows of the gallery to its staging folder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = list((cache / "embeddings").glob(".*-gallery-*.staging/part-*.idx")) if (cache / "embeddings").is_dir() else []
        if sum(p.stat().st_size for p in parts) // 8 >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"the extraction did not reach {rows} rows in {timeout} s")


@pytest.mark.slow
def test_sigterm_then_kill_9_mid_extraction_then_the_same_command_resumes(tmp_path):
    overrides = ("data=synthetic", "model.pretrained=false", "model.image_size=32", "batch_size=16",
                 "data.num_classes=10", "data.gallery_per_class=150", "data.query_per_class=2", "method=flat")
    command = imgret_command(tmp_path, *overrides)
    uri = sqlite_uri(tmp_path)

    first = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(tmp_path / "cache", 160)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted by SIGTERM: the run is marked KILLED"
    assert "Traceback" not in stderr
    assert [r.info.status for r in all_runs(uri)] == ["KILLED"]

    second = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(tmp_path / "cache", 600)
    os.kill(second.pid, signal.SIGKILL)
    second.wait(timeout=60)
    assert [r.info.status for r in all_runs(uri)] == ["KILLED", "RUNNING"], "kill -9 leaves its run RUNNING"

    third = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    runs = all_runs(uri)
    assert [r.info.status for r in runs] == ["KILLED", "KILLED", "FINISHED"], "nothing is left RUNNING"
    assert "ended without closing the run" in runs[1].data.tags["killed_reason"]
    store = Path(runs[2].data.tags["gallery_store"])
    extraction = json.loads((store / "meta.json").read_text())["extraction"]
    assert 600 <= extraction["resumed_rows"] < 1500 and extraction["images"] == 1500 - extraction["resumed_rows"]
    assert not list(store.parent.glob(".*.staging")), "the staging folder goes once the store is committed"

    # the resumed store holds what one uninterrupted extraction gives
    clean = subprocess.run(imgret_command(tmp_path / "clean", *overrides), cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    clean_store = tmp_path / "clean" / "cache" / "embeddings" / store.name
    assert np.allclose(np.load(store / "vectors.npy"), np.load(clean_store / "vectors.npy"), atol=1e-5)
    assert (store / "paths.txt").read_text() == (clean_store / "paths.txt").read_text()


@pytest.mark.slow
def test_ctrl_c_ends_a_sweep_killed_and_a_rerun_runs_only_what_did_not_finish(tmp_path):
    # flat finishes quickly on a cached store; the sweep is interrupted while the second point extracts
    base = ("data=synthetic", "model.pretrained=false", "model.image_size=32", "batch_size=16", "data.num_classes=10",
            "data.query_per_class=2", "method=flat", "k=5")
    sweep = imgret_command(tmp_path, *base, "data.gallery_per_class=10,150", multirun=True)
    first = subprocess.Popen(sweep, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(tmp_path / "cache", 300)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-2000:]
    runs = all_runs(sqlite_uri(tmp_path))
    parent = next(r for r in runs if r.data.tags.get("imgret.role") == "multirun")
    assert parent.info.status == "KILLED" and parent.data.tags["failed_jobs"] == "0"
    assert (parent.data.tags["jobs"], parent.data.tags["finished_jobs"]) == ("2", "1"), "one finished, one killed"
    assert sorted(r.info.status for r in runs if r is not parent) == ["FINISHED", "KILLED"]

    again = subprocess.run(sweep, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    runs = all_runs(sqlite_uri(tmp_path))
    second_parent = [r for r in runs if r.data.tags.get("imgret.role") == "multirun"][-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second_parent.info.run_id]
    assert second_parent.info.status == "FINISHED" and len(children) == 2
    linked = [c for c in children if "imgret.reused_run_id" in c.data.tags]
    assert len(linked) == 1 and linked[0].data.params["data.gallery_per_class"] == "10", "the finished point is linked"
    rerun = next(c for c in children if c not in linked)
    assert json.loads((Path(rerun.data.tags["gallery_store"]) / "meta.json").read_text())["extraction"][
        "resumed_rows"] >= 300


@pytest.mark.slow
def test_rerunning_a_finished_sweep_runs_no_point_again_and_force_does(tmp_path):
    sweep = ("method=flat,ivf", "nlist=4", "nprobe=1,4")
    for attempt in range(2):
        result = run_imgret(tmp_path, *SYNTHETIC_FAST, *sweep, multirun=True)
        assert result.returncode == 0, result.stderr[-2000:]
    runs = all_runs(sqlite_uri(tmp_path))
    parents = [r for r in runs if r.data.tags.get("imgret.role") == "multirun"]
    second = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    first = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert len(second) == 4 and all(r.data.tags["imgret.reused_run_id"] in first for r in second)
    for link in second:  # a link carries the original's numbers, so the report covers the whole sweep
        assert link.data.metrics == first[link.data.tags["imgret.reused_run_id"]].data.metrics

    from imgret.report import main as report
    out = report(["--tracking-uri", sqlite_uri(tmp_path), "--out", str(tmp_path / "report")])
    assert len((out / "runs.csv").read_text().strip().splitlines()) == 1 + 4

    forced = run_imgret(tmp_path, *SYNTHETIC_FAST, "method=flat", "nlist=4", "nprobe=1", "force=true", multirun=True)
    assert forced.returncode == 0, forced.stderr[-2000:]
    newest = [r for r in all_runs(sqlite_uri(tmp_path)) if r.data.tags.get("imgret.role") != "multirun"][-1]
    assert "imgret.reused_run_id" not in newest.data.tags and newest.data.tags["method"] == "flat"

    # The same sweep with imgret's code changed (a copy of the package, laid out as a wheel lays it out, one comment
    # added): every point runs again, under another code digest and provenance.
    changed = copy_of_imgret(tmp_path / "changed")
    with open(changed / "imgret" / "pipeline.py", "a") as source:
        source.write("# a change to imgret's code\n")
    rerun = subprocess.run(imgret_command(tmp_path, *SYNTHETIC_FAST, *sweep, multirun=True), cwd=tmp_path,  # not the
                           capture_output=True, text=True, timeout=600,  # project's folder, whose imgret/ comes first
                           env={**os.environ, "PYTHONPATH": str(changed)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    runs = all_runs(sqlite_uri(tmp_path))
    last_parent = [r for r in runs if r.data.tags.get("imgret.role") == "multirun"][-1]
    third = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == last_parent.info.run_id]
    third_ids = {r.info.run_id for r in third}
    assert len(third) == 4 and all(r.data.tags.get("imgret.reused_run_id", r.info.run_id) in third_ids for r in third)
    assert sum("imgret.reused_run_id" in r.data.tags for r in third) == 1, "flat at nprobe=4: its own sweep's flat run"
    assert {r.data.tags["imgret.code_digest"] for r in third}.isdisjoint(
        {r.data.tags["imgret.code_digest"] for r in first.values()})
    assert all(r.data.tags["imgret.provenance"] != next(iter(first.values())).data.tags["imgret.provenance"]
               for r in third)
    out = report(["--tracking-uri", sqlite_uri(tmp_path), "--all-runs", "--out", str(tmp_path / "mixed")])
    assert "WARNING: these 7 points come from 2 provenances" in (out / "report.md").read_text()


def copy_of_imgret(folder: Path) -> Path:
    """imgret's package with its configs inside it (as in the wheel), importable through PYTHONPATH=folder."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(PROJECT_ROOT / "imgret", folder / "imgret", ignore=ignore)
    shutil.copytree(PROJECT_ROOT / "conf", folder / "imgret" / "conf", ignore=ignore, symlinks=False)
    return folder


@pytest.mark.slow
def test_the_report_skips_an_incomplete_sweep_and_lists_what_it_misses(tmp_path, capsys):
    unusable = tmp_path / "unusable" / "a"
    unusable.mkdir(parents=True)
    for i in range(3):
        (unusable / f"{i}.jpg").write_bytes(b"")
    good = write_images(tmp_path / "good", per_class=8)
    data = ("data=folder", "model.pretrained=false", "model.image_size=32", "k=10")
    complete = run_imgret(tmp_path, *data, f"data.gallery_dir={good}", "method=flat,brute", multirun=True)
    assert complete.returncode == 0, complete.stderr[-2000:]
    incomplete = run_imgret(tmp_path, *data, "method=flat", f"data.gallery_dir={good},{unusable.parent}",
                            multirun=True)
    assert incomplete.returncode != 0

    from imgret.report import main as report
    runs = all_runs(sqlite_uri(tmp_path))
    parents = [r for r in runs if r.data.tags.get("imgret.role") == "multirun"]
    assert [p.info.status for p in parents] == ["FINISHED", "FAILED"]
    out = report(["--tracking-uri", sqlite_uri(tmp_path), "--out", str(tmp_path / "latest")])
    reported = {line.split(",")[-1] for line in (out / "runs.csv").read_text().strip().splitlines()[1:]}
    of_the_complete_sweep = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert reported == of_the_complete_sweep and len(reported) == 2, "the newest sweep whose points all finished"
    capsys.readouterr()
    report(["--tracking-uri", sqlite_uri(tmp_path), "--parent", parents[1].info.run_id, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "is incomplete (FAILED): 1 planned points have no finished run" in err
    assert "missing: " in err and f"data.gallery_dir={unusable.parent}" in err


@pytest.mark.slow
def test_a_sweep_whose_plan_cannot_be_read_is_not_reported_complete(tmp_path):
    """An earlier report took any error reading the plan for "nothing missing"."""
    sweep = run_imgret(tmp_path, *SYNTHETIC_FAST, "method=flat,brute", multirun=True)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    parent = next(r for r in all_runs(sqlite_uri(tmp_path)) if r.data.tags.get("imgret.role") == "multirun")
    [plan] = (tmp_path / "mlruns" / "artifacts").rglob(f"{parent.info.run_id}/artifacts/planned_points.json")
    plan.unlink()
    from imgret.report import main as report

    with pytest.raises(SystemExit, match=rf"cannot check whether sweep {parent.info.run_id} is complete: its plan "
                                         r"\(planned_points.json, 2 points\) cannot be read"):
        report(["--tracking-uri", sqlite_uri(tmp_path), "--parent", parent.info.run_id, "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r" / "report.md").exists()


# --------------------------------------------------------------------------- a real MLflow server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1, its own process group, stopped by its process id."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.uri = f"http://127.0.0.1:{port}"
        self.process = None

    def start(self) -> "MlflowServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(Path(PYTHON).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"],
            stdout=open(self.folder / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        import urllib.request
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server", free_port()).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_with_a_remote_server_artifacts_go_to_the_server_and_a_lost_server_loses_nothing(tmp_path, mlflow_server):
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    quick = subprocess.run(imgret_command(client_dir, *SYNTHETIC_FAST, "method=flat", "k=5", uri=mlflow_server.uri),
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert quick.returncode == 0, quick.stderr[-2000:]
    run = all_runs(mlflow_server.uri)[0]
    artifacts = mlflow_server.folder / "artifacts"
    assert (artifacts / run.info.experiment_id / run.info.run_id / "artifacts" / "results.json").is_file()
    assert not list(PROJECT_ROOT.glob("mlruns/artifacts/*/" + run.info.run_id)) and not (client_dir / "mlruns").exists()

    # the server goes away while a job extracts: the job finishes and keeps its results for later
    slow = subprocess.Popen(
        imgret_command(client_dir, "data=synthetic", "model.pretrained=false", "model.image_size=64",
                       "data.num_classes=10", "data.gallery_per_class=100", "batch_size=16", "method=flat",
                       uri=mlflow_server.uri),
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
    wait_for_rows(client_dir / "cache", 100)
    mlflow_server.stop()
    started = time.monotonic()
    _, stderr = slow.communicate(timeout=300)
    assert slow.returncode == 0, stderr[-2000:]
    assert time.monotonic() - started < 90, "a lost server costs a job about a minute at most"
    line = next(l for l in stderr.splitlines() if l.startswith("tracking server lost"))
    folder = Path(line.split("python -m imgret.track.runs sync ")[1])
    record = json.loads((folder / "mlflow_record.json").read_text())
    assert record["metrics"]["recall_at_10"] == 1.0 and record["status"] == "FINISHED"
    assert (folder / "artifacts" / "results.json").is_file()

    mlflow_server.start()
    assert f"python -m imgret.track.runs sync {folder}" == \
        smaller(documented("python -m imgret.track.runs sync <that folder>"), {"<that folder>": str(folder)})
    synced = run_command(f"python -m imgret.track.runs sync {folder}", PROJECT_ROOT)
    runs = all_runs(mlflow_server.uri)
    assert len(runs) == 2 and [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert runs[1].info.run_id == record["run_id"], "logged into the run the job had started"
    assert runs[1].data.metrics["recall_at_10"] == 1.0
    assert {a.path for a in MlflowClient().list_artifacts(runs[1].info.run_id)} >= {"config.yaml", "results.json"}
    assert (folder / "mlflow_record.json.synced").is_file(), "a job's own output folder keeps its record"


@pytest.mark.slow
def test_after_a_sweep_mlflow_ui_opens_on_the_runs_and_the_parent_page_states_the_operating_points(tmp_path):
    """What a new user sees: MLflow's UI (a real server on 127.0.0.1, Debian's chromium) opens the experiment on
    its runs table, not on an empty GenAI traces page, and the sweep's parent run's own page shows its operating
    points (its description)."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: apt-get install chromium (.ci/run installs it)")
    server = MlflowServer(tmp_path / "server", free_port())
    store = f"sqlite:///{server.folder / 'mlflow.db'}"
    server.folder.mkdir()
    sweep = run_imgret(tmp_path, *SYNTHETIC_FAST, "method=flat,ivf", "nlist=4", "nprobe=1,4", multirun=True,
                       uri=store)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    parent = next(r for r in all_runs(store) if r.data.tags.get("imgret.role") == "multirun")
    printed = next(line for line in sweep.stderr.splitlines() if line.startswith("the sweep's operating points: "))
    parent_page = printed.split("then http://127.0.0.1:5000/", 1)[1]
    note = parent.data.tags["mlflow.note.content"]
    ivf_row = next(line for line in note.splitlines() if line.startswith("| resnet18 | FAISS IVF |"))
    server.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                # the experiment's page as the README's link gives it (the parent's link without /runs/<id>)
                page.goto(f"{server.uri}/{parent_page.replace(f'/runs/{parent.info.run_id}', '')}")
                page.get_by_text("multirun ").first.wait_for(timeout=60000)  # the runs table, the parent's row
                assert page.get_by_text("Run Name").count() >= 1 and page.get_by_text("No data available").count() == 0
                page.screenshot(path=str(tmp_path / "experiment.png"))
                page.goto(f"{server.uri}/{parent_page}")  # the link the sweep printed, on the server
                page.get_by_text("Operating points").first.wait_for(timeout=60000)
                setting = ivf_row.split("|")[3].strip().split(":")[0]  # e.g. nlist=4 nprobe=1
                assert page.get_by_text(setting).count() >= 1
                page.screenshot(path=str(tmp_path / "parent.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_during_a_native_index_build_is_killed_within_10_s_and_caches_nothing(tmp_path):
    # one chunk of 65,536 rows added to a single-thread hnswlib graph: one native call of tens of seconds that,
    # unlike FAISS's (whose bindings check for signals inside), never lets Python run a signal handler
    command = imgret_command(tmp_path, "data=synthetic_vectors", "data.gallery_size=65536", "data.query_size=20",
                             "data.dim=64", "method=hnswlib", "threads=1")
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "building {'method': 'hnswlib'" in line:
                break
        else:
            raise AssertionError("the run ended before its build: " + "".join(lines)[-2000:])
        time.sleep(3)  # well inside the build
        indexes = tmp_path / "cache" / "indexes"
        assert not list(indexes.rglob("*.json")), "the build is still running when the signal comes"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        process.kill()
    output = "".join(lines) + rest
    assert process.returncode == 143, output[-2000:]
    assert took < 10, f"the run took {took:.1f} s to end after SIGTERM"
    assert output.strip().endswith("interrupted by SIGTERM: the run is marked KILLED")  # after the build's bar
    assert "Traceback" not in output
    assert [r.info.status for r in all_runs(sqlite_uri(tmp_path))] == ["KILLED"]
    left = [p.name for p in indexes.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert left == [], f"an interrupted build left {left} in the index cache"


def test_a_write_that_raced_another_writer_is_tried_again_and_a_refusal_is_not(tmp_path):
    """sqlite's "database is locked" (another process writing) is retried, with a growing pause, until it goes
    through; any other error is the store's answer at once."""
    from sqlalchemy.exc import OperationalError

    recorder = imgret.track.runs.RunRecorder(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "run", tmp_path, {})
    calls = []

    def locked_twice():
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))

    recorder._remote(locked_twice)
    assert len(calls) == 3 and recorder.lost is None
    assert calls[2] - calls[1] > calls[1] - calls[0] >= 0.2

    refused = []

    def refuse():
        refused.append(1)
        raise ValueError("Changing param values is not allowed")

    with pytest.raises(TrackingRefused, match="refused refuse for run run: ValueError: Changing param values"):
        recorder._remote(refuse)
    assert len(refused) == 1
