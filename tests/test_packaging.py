"""The built wheel: its configs travel inside it, its console commands work from an empty folder, away from
the checkout."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile

import pytest

from conftest import PROJECT_ROOT
from documented import documented
from test_faults import all_runs

PYTHON = sys.executable
# build the wheel, install it, go to an empty folder, run: the README's one line
README_STEPS = documented("python -m pip wheel --no-deps . -w dist").split(" && ")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without its dependencies, which this venv has) into a
    folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    build, install, _, _ = README_STEPS
    assert build == "python -m pip wheel --no-deps . -w dist"
    # the checkout as `.`, the wheel written here rather than into the checkout's dist/
    subprocess.run([PYTHON, *shlex.split(build.replace(" . -w dist", f" {PROJECT_ROOT} -w {tmp / 'dist'}"))[1:], "-q",
                    "--no-build-isolation"], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("imgret-*.whl"))
    assert install == f"python -m pip install dist/{wheel.name}", "the README names the wheel that is built"
    # into a folder of its own rather than this environment, which the other tests use
    subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                   check=True, cwd=tmp)
    return wheel, tmp / "site"


def command(site, name, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("IMGRET_CACHE", None)
    return subprocess.run([str(site / "bin" / name), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_the_wheel_holds_the_configs_and_the_page(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("config.yaml", "serve.yaml", "data/synthetic.yaml", "model/resnet18.yaml", "method/ivf.yaml",
                   "experiment/seed_table.yaml", "hydra/launcher/slurm.yaml"):
        assert f"imgret/conf/{config}" in names, config
    assert "imgret/serve/page.html" in names


@pytest.mark.slow
def test_console_commands_run_from_an_empty_folder(installed, tmp_path):
    _, site = installed
    empty = tmp_path / "empty"
    empty.mkdir()
    where = command(site, "imgret-run", "--info", "searchpath", cwd=empty)
    assert where.returncode == 0 and "pkg://imgret.conf" in where.stdout, where.stderr
    assert README_STEPS[2] == 'cd "$(mktemp -d)"'
    done = command(site, *shlex.split(README_STEPS[3]), cwd=empty)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = all_runs(f"sqlite:///{empty / 'mlruns' / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    screen = done.stdout + done.stderr
    assert screen.splitlines()[0].endswith("checking the configuration (synthetic, resnet18, ivf) ...")
    assert f"MLflow run {runs[0].info.run_id} (resnet18-ivf-nlist16-nprobe8); to see it: `mlflow ui" in screen
    assert "recall@1 / @10 / @k" in screen and "peak resident set (GB)" in screen
    assert "gallery · resnet18, batches of 64: 100%" in screen and "Predicting" not in screen  # bars say what they count
    assert "Loading faiss" not in screen and "LeafSpec" not in screen  # third-party noise filtered
    assert runs[0].data.params["nlist"] == "16"  # data=synthetic's own defaults, read from the wheel's configs
    assert (empty / ".cache" / "imgret" / "embeddings").is_dir()
    imported = subprocess.run([PYTHON, "-c", "import imgret; print(imgret.__file__)"], cwd=empty, text=True,
                              capture_output=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert imported.stdout.startswith(str(site))  # the wheel's copy, not the checkout's
    shown = command(site, "imgret-run", "--help", cwd=empty)
    assert shown.returncode == 0, shown.stderr
    for expected in ("data=", "synthetic          Generated images", "model=", "resnet18           ResNet-18",
                     "k: 10          # neighbours returned per query", "--multirun"):
        assert expected in shown.stdout, expected
    reported = command(site, "imgret-report", "--all-runs", "--out", str(tmp_path / "report"), cwd=empty)
    assert reported.returncode == 0 and (tmp_path / "report" / "report.html").is_file(), reported.stderr[-2000:]
    for name in ("imgret-report", "imgret-bench"):
        shown = command(site, name, "--help", cwd=empty)
        assert shown.returncode == 0 and "usage:" in shown.stdout, (name, shown.stderr)
    serve_config = command(site, "imgret-serve", "--cfg", "job", cwd=empty)  # composes; does not start
    assert serve_config.returncode == 0 and "host: 127.0.0.1" in serve_config.stdout and "port: 8000" in serve_config.stdout
