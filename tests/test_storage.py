"""A cache or tracking store that cannot take writes, on real small file systems (tmpfs, mounted here as root): a
full disk, a read-only one, a cache that vanishes mid-run. Each is one line naming the path and what to do; the run
is FAILED with it; nothing half-written is committed; the run started again resumes (or its results are synced)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from conftest import PROJECT_ROOT, SYNTHETIC_FAST
from imgret.errors import StorageError

# 600 images of 512 floats: about 1.2 MB a store, written twice over before it commits
IMAGES = (*SYNTHETIC_FAST, "data.num_classes=10", "data.gallery_per_class=50", "data.query_per_class=10",
          "method=flat", "search.latency_queries=5", "search.warmup_queries=1", "extract.precision=32-true")


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of a few MB at tmp_path/fs, mounted for the test and unmounted after it (skipped where this process
    may not mount: not root, or a container without CAP_SYS_ADMIN)."""
    mounted = []

    def mount(size_kb: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk-full tests need one")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount(point: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(point)], check=True)


def fill(point: Path) -> Path:
    """Take every free byte of the file system at `point`."""
    filler = point / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def when_staging_appears(cache: Path, act) -> threading.Thread:
    """Run `act` as soon as an extraction has written its first rows under `cache` (a part in its staging folder)."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(part.stat().st_size > 0 for part in cache.glob("embeddings/.*.staging/part-*.f32")):
                act()
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def failed_run(cfg):
    mlflow.set_tracking_uri(cfg.tracking.uri)
    [run] = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    return run


def one_line(error) -> str:
    text = str(error)
    assert "\n" not in text
    print(f"\n{type(error).__name__}: {text}")  # what the note quotes (pytest -s)
    return text


def test_a_cache_too_small_is_refused_before_extracting_with_both_sizes(make_cfg, tmpfs):
    from imgret.run import run_tracked

    cache = tmpfs(1024)
    cfg = make_cfg(*IMAGES, f"paths.cache={cache}")
    with pytest.raises(StorageError) as error:
        run_tracked(cfg)
    text = one_line(error.value)
    assert text.startswith(f"{cache}: the embedding stores of 600 images (written in parts, then merged) need about ")
    assert "MB free: free space there or set paths.cache to a folder on a larger disk" in text
    run = failed_run(cfg)
    assert run.info.status == "FAILED" and run.data.tags["error"] == f"StorageError: {text}"
    assert not list(cache.glob("embeddings/*"))  # nothing was started


@pytest.mark.slow  # a real extraction on a tmpfs
def test_a_disk_filling_up_mid_extraction_is_one_line_and_the_run_resumes(make_cfg, tmpfs, caplog):
    from imgret.run import run_tracked

    cache = tmpfs(8 * 1024)
    cfg = make_cfg(*IMAGES, f"paths.cache={cache}", "batch_size=8")
    filler = []
    when_staging_appears(cache, lambda: filler.append(fill(cache)))
    with pytest.raises(StorageError) as error:
        run_tracked(cfg)
    text = one_line(error.value)
    assert ": no space left on the disk of paths.cache=" in text and "the run resumes from what was written" in text
    assert failed_run(cfg).info.status == "FAILED"
    assert not list(cache.glob("embeddings/*/meta.json"))  # no store committed half-written
    filler[0].unlink()
    import logging

    with caplog.at_level(logging.INFO, logger="imgret.embed.extract"):
        metrics = run_tracked(cfg)
    assert metrics["recall_at_10"] == 1.0
    assert any("resuming the gallery store" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # a real extraction on a tmpfs
def test_a_cache_read_only_once_the_run_started_is_one_line(make_cfg, tmpfs, monkeypatch):
    """Linux refuses to remount a file system read-only while a file on it is open for writing (EBUSY), so the
    file system goes read-only between the checks and the run instead: the first write meets the kernel's EROFS."""
    from imgret import validate
    from imgret.run import run_tracked

    cache = tmpfs(8 * 1024)
    cfg = make_cfg(*IMAGES, f"paths.cache={cache}", "batch_size=8")
    checked = validate.check_writable

    def check_then_remount(key, folder, value=None):
        checked(key, folder, value)
        if Path(folder) == cache:
            remount(cache, "ro")

    monkeypatch.setattr(validate, "check_writable", check_then_remount)
    with pytest.raises(StorageError) as error:
        run_tracked(cfg)
    text = one_line(error.value)
    assert text.endswith(f"the file system of paths.cache={cache} is read-only: remount it writable or set "
                         "paths.cache to a writable folder")
    assert failed_run(cfg).info.status == "FAILED"


def test_a_read_only_cache_is_refused_before_any_run(make_cfg, tmpfs):
    from imgret.errors import ConfigError
    from imgret.run import run_tracked

    cache = tmpfs(1024)
    remount(cache, "ro")
    cfg = make_cfg(*IMAGES, f"paths.cache={cache}")
    with pytest.raises(ConfigError, match=rf"^paths.cache={cache}: a folder this process can write to \(Read-only"):
        run_tracked(cfg)
    assert not Path(cfg.tracking.uri[len("sqlite:///"):]).exists()


@pytest.mark.slow  # a real extraction on a tmpfs
def test_a_cache_that_vanishes_mid_run_is_one_line(make_cfg, tmp_path):
    from imgret.run import run_tracked

    cache = tmp_path / "cache-that-goes"
    cfg = make_cfg(*IMAGES, f"paths.cache={cache}", "batch_size=8")
    when_staging_appears(cache, lambda: shutil.rmtree(cache, ignore_errors=True))
    with pytest.raises(StorageError) as error:
        run_tracked(cfg)
    text = one_line(error.value)
    assert f"paths.cache={cache} vanished while the run wrote to it" in text
    assert failed_run(cfg).info.status == "FAILED"


@pytest.mark.slow
def test_the_command_line_says_one_line_and_exits_1(tmp_path, tmpfs):
    cache = tmpfs(1024)
    command = [sys.executable, "-m", "imgret.run", *IMAGES, f"paths.cache={cache}",
               f"tracking.uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "extract.progress=false",
               f"hydra.run.dir={tmp_path / 'hydra'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {cache}: the embedding stores of 600 images")


@pytest.mark.slow  # a real extraction on a tmpfs
def test_a_full_tracking_store_is_named_as_such_and_the_results_are_kept_for_sync(make_cfg, tmpfs, tmp_path, capsys):
    from imgret.run import run_tracked
    from imgret.track.runs import sync
    from imgret.track.store import TrackingSettings, open_tracking

    store = tmpfs(4 * 1024)
    cfg = make_cfg(*IMAGES, f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                   f"tracking.artifact_root={tmp_path / 'artifacts'}")
    open_tracking(TrackingSettings.of(cfg.tracking))  # the store made while there was room
    filler = fill(store)
    metrics = run_tracked(cfg)
    printed = capsys.readouterr()
    said = printed.err + printed.out
    print(said)
    assert "tracking server lost" not in said
    assert f"tracking store {cfg.tracking.uri} is full" in said
    import re

    folder = Path(re.search(r"results are kept in (\S+?)\. Log them", said).group(1))
    assert metrics["recall_at_10"] == 1.0
    filler.unlink()
    run_id = sync(folder)
    assert mlflow.get_run(run_id).data.metrics["recall_at_10"] == 1.0
    assert not folder.exists(), "the temporary folder the run made for itself is removed once logged"
