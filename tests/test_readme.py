"""Every command the README and the config comments document runs, at small sizes where theirs are large.

Each test names the command it runs by a fragment (tests/documented.py), so a command edited in the README is
run as edited. Small forms: the real Tiny-ImageNet archive becomes a 4-class subset of it in the same layout,
million-vector galleries become 20,000 vectors, `nlist` shrinks with the gallery, downloads (weights, the
official zip) are replaced by what the README's offline line says (`data.archive=... model.pretrained=false`).
Commands that need what this machine has not (GPUs, Slurm, a second node) are checked as far as it can: the
GPU command is refused with the documented one line, the Slurm sweep composes onto submitit, torchrun runs on
one node. Commands run by other tests: see `test_every_documented_command_is_run_by_a_test`.
"""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import write_images
from documented import (NAMES, PROJECT_ROOT, QUICK, documentation_text, documented, documented_commands, environment,
                        run_command, run_python, sandbox, smaller)

OFFLINE_ARCHIVE = "data.archive=../shared/data/tiny-imagenet-200.zip"
QUICKSTART_PRECISION = 0.4  # the 4-class subset, chance 0.25: trained features gave 0.642 here (mAP@10 0.553)
MILLION = {"data.gallery_size=1280000": "data.gallery_size=5000", "data.query_size=10000": "data.query_size=100",
           "nlist=4096": "nlist=32"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One sandbox for this module's commands, so that stores made by one are reused by the next, as for a reader
    who runs them in order."""
    return sandbox(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def subset(tiny_subset_zip) -> tuple[str, ...]:
    """The overrides that stand for the real archive: its 4-class subset, accepted by its own checksum."""
    archive, digest = tiny_subset_zip
    return f"data.archive={archive}", f"data.checksums=[{digest}]"


def offline(command: str, subset: tuple[str, ...], *extra: str) -> str:
    """A Tiny-ImageNet command at the subset's size: the subset for the archive, nlist for its 48 images."""
    if OFFLINE_ARCHIVE in command:
        return smaller(command, {OFFLINE_ARCHIVE: " ".join(subset)}, ("nlist=8", *QUICK, *extra))
    return smaller(command, None, (*subset, "model.pretrained=false", "nlist=8", *QUICK, *extra))


def mlflow_runs(work: Path, status: str = "FINISHED", **where) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["imgret"], output_format="list")
    return [r for r in runs if r.info.status == status and all(r.data.tags.get(k) == v for k, v in where.items())]


# --------------------------------------------------------------------------- every command is someone's


CLAIMED = re.compile(r"""documented\(\s*(['"])(.+?)\1\s*\)""", re.S)


def test_every_documented_command_is_run_by_a_test():
    """Each command in the README and in conf/'s comments is named (by a fragment that picks it alone) in some
    test, so a new command without a test fails here."""
    commands = documented_commands()
    claimed: dict[str, list[str]] = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for match in CLAIMED.finditer(path.read_text()):
            fragment = ast.literal_eval("(" + match.group(1) + match.group(2) + match.group(1) + ")")
            claimed.setdefault(documented(fragment), []).append(path.name)
    missing = {command: where for command, where in commands.items() if command not in claimed}
    assert not missing, f"documented commands no test runs: {json.dumps(missing, indent=1)}"
    assert len(commands) > 40


def test_the_readme_test_command_is_what_ci_runs():
    readme_test = documented("pip install -e '.[test]' && ")
    browser = ("(command -v chromium && test -x /usr/bin/time && command -v slurmd && command -v socat || (apt-get update && "
               "apt-get install -y chromium time socat && apt-get install -y --no-install-recommends slurm-wlm munge)) && ")
    assert readme_test.startswith(browser)  # .ci/run does the same in its own lines
    assert readme_test[len(browser):] in (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()


def test_names_in_the_prose_are_real_commands():
    """Code spans that name a command (`imgret-run`, `python -m imgret.X`) rather than show one to run: each still
    stands in the README, and its program is installed (a console command) or importable (a module)."""
    import importlib.util
    import shutil

    readme = documentation_text()
    path = environment()["PATH"]
    for name in sorted(NAMES):
        assert f"`{name}`" in readme, f"{name!r} is no longer named in the README or the docs: drop it from NAMES"
        words = name.split()
        if words[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(words[2].removesuffix(".X")) is not None, name
        else:
            assert shutil.which(words[0], path=path), name


# --------------------------------------------------------------------------- Quickstart and the shell


def test_quickstart_runs_real_features_and_shows_their_quality(work, subset):
    command = documented(".venv/bin/pip install -e . && .venv/bin/python -m imgret.run")
    install, run = command.split(" && .venv/bin/python ", 1)
    assert install == "python3 -m venv .venv && .venv/bin/pip install -e ."  # what .ci/run does, with the test extra
    result = run_command(smaller("python " + run, {OFFLINE_ARCHIVE: " ".join(subset), "nlist=64": "nlist=8"}, QUICK),
                         work)
    assert "precision@10 / mAP@10" in result.stdout + result.stderr  # the results table shows retrieval quality
    children = [r for r in mlflow_runs(work) if r.data.tags.get("imgret.role") != "multirun"]
    assert sorted((r.data.tags["model"], r.data.tags["method"]) for r in children) == \
        sorted(("efficientnet_lite0", x) for x in ("brute", "flat", "ivf"))
    from imgret.embed.weights import PACKAGED

    assert {r.data.tags["weights"] for r in children} == {PACKAGED["tf_efficientnet_lite0"].identity}
    # 4 real classes, 12 gallery images each: chance precision@10 is 0.25; trained features sort them by class
    exact = next(r for r in children if r.data.tags["method"] == "flat").data.metrics
    assert exact["precision_at_10"] > QUICKSTART_PRECISION and exact["map_at_10"] > 0.25, exact


def test_the_quick_subset_selects_by_marker(work):
    command = documented('.venv/bin/python -m pytest -m "not slow"')
    result = run_command(smaller(command, {".venv/bin/python": "python"},
                                 ("--collect-only", "-q", "tests/test_readme.py")), PROJECT_ROOT)
    selected = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", result.stdout)
    assert selected and int(selected.group(3)) > 0, result.stdout[-500:]


def test_the_shell_commands(work):
    activate = documented("source .venv/bin/activate")
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").is_file():
        result = run_command(smaller(activate, {".venv": str(venv)}, ()) + " && command -v python", work)
        assert result.stdout.strip() == str(venv / "bin" / "python")
    shown = run_command(documented("imgret-run --help"), work).stdout
    conf = PROJECT_ROOT / "conf"
    for group in ("data", "model", "method", "experiment"):  # every option of every group, from conf/ itself
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        lines = shown.splitlines()
        start = lines.index(f"  {'+' if group == 'experiment' else ''}{group}=") + 1
        listed = [line.split()[0] for line in lines[start:start + len(options) + 1] if line.startswith("      ")]
        assert listed == options, group
    comment = next(line for line in (conf / "config.yaml").read_text().splitlines() if line.startswith("nprobe:"))
    assert comment.split("#", 1)[1].strip() in " ".join(shown.split()), "each key with its comment"
    completion = run_command(documented('eval "$(imgret-run -sc install=bash)"') + " && complete -p imgret-run",
                             work).stdout
    assert "imgret-run" in completion


def test_the_install_commands_resolve():
    """Dry runs: they resolve and would install, without touching the environment under test."""
    for command in (documented("pip install ."), documented("pip install -e '.[launchers]'")):
        result = run_command(smaller(command, None, ("--dry-run", "--no-build-isolation", "--no-deps")), PROJECT_ROOT)
        assert "Would install imgret" in result.stdout
    extra, diskann = documented("pip install -e '.[ann]'").split(" && ")
    assert "Would install imgret" in run_command(extra + " --dry-run --no-build-isolation --no-deps", PROJECT_ROOT).stdout
    assert "diskannpy" in run_command(diskann + " --dry-run", PROJECT_ROOT).stdout


# --------------------------------------------------------------------------- Running experiments


def test_one_run_and_the_config_comments_example(work, subset):
    """Offline, as the README says: the archive and random weights (test_models: the offline failure itself)."""
    run_command(offline(documented("python -m imgret.run model=clip method=flat"), subset), work)
    run_command(offline(documented("model=clip method=flat k=5"), subset), work)
    runs = mlflow_runs(work, model="clip", method="flat")
    assert sorted(r.data.params["k"] for r in runs) == ["10", "5"]
    assert len({r.data.tags["gallery_store"] for r in runs}) == 1, "the second run reuses the first one's store"


@pytest.mark.slow  # two README sweeps of several runs each
def test_the_seed_table_and_the_ivf_sweep(work, subset):
    run_command(offline(documented("-m model=resnet18,mobilenet,clip method=brute,flat,ivf"), subset), work)
    sweep = smaller(documented("method=ivf nprobe=1,4,16,64"), {"nprobe=1,4,16,64": "nprobe=1,4,8"})
    run_command(offline(sweep, subset), work)
    ivf = mlflow_runs(work, method="ivf")
    assert {(r.data.tags["model"], r.data.params["nprobe"]) for r in ivf} >= \
        {(m, p) for m in ("resnet18", "mobilenet", "clip") for p in ("1", "4", "8")}


@pytest.mark.slow
def test_offline_checkpoint_folder_and_imagenet(work, subset):
    run_command(offline(documented("imgret.run data.archive=../shared/data/tiny-imagenet-200.zip model.pretrained"),
                        subset), work)

    import timm
    import torch

    weights = work / "resnet18_state_dict.pt"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), weights)
    run_command(offline(smaller(documented("model.checkpoint=/path/to/resnet18_state_dict.pt"),
                                {"/path/to/resnet18_state_dict.pt": str(weights)}), subset), work)

    photos = write_images(work / "photos", classes=("cats", "dogs", "owls"), per_class=10)
    run_command(smaller(documented("data=folder data.gallery_dir=/photos"), {"/photos": str(photos)},
                        ("model.pretrained=false", "nlist=8", *QUICK)), work)

    from test_imagenet import make_tree, write_solution

    root = work / "ILSVRC2012"
    make_tree(root)
    write_solution(root / "LOC_val_solution.csv")
    run_command(smaller(documented("data=imagenet data.root=/data/ILSVRC2012"), {"/data/ILSVRC2012": str(root)},
                        ("model.pretrained=false", "nlist=2", "nprobe=2", *QUICK)), work)
    assert {r.data.tags.get("dataset") for r in mlflow_runs(work)} >= {"tiny_imagenet", "folder", "imagenet"}
    assert any(r.data.params.get("model.checkpoint") == str(weights) for r in mlflow_runs(work))


def test_generated_images_and_vectors(work):
    run_command(smaller(documented("python -m imgret.run data=synthetic model.pretrained=false"), None, QUICK), work)
    readme = documented("python -m imgret.run data=synthetic_vectors data.gallery_size=1280000 data.query_size=10000 "
                        "data.dim=512 method=ivf nlist=4096 nprobe=16")
    in_conf = documented("data.gallery_size=1280000 data.query_size=10000 method=ivf")
    timed = documented("/usr/bin/time -v python -m imgret.run data=synthetic_vectors")
    for command in (readme, in_conf):
        run_command(smaller(command, MILLION, QUICK), work)
    result = run_command(smaller(timed, MILLION, QUICK), work)
    assert "Maximum resident set size" in result.stderr
    sizes = {r.data.params["gallery_size"] for r in mlflow_runs(work, dataset="synthetic_vectors")}
    assert sizes == {"5000"}


def test_embeddings_you_already_have(work):
    from test_vector_files import GALLERY, QUERIES, write_hdf5, write_vecs

    run_command(documented("np.save('emb.npy'"), work)
    assert np.load(work / "emb.npy").shape == (20000, 64)
    run_command(smaller(documented("data=vectors data.gallery=emb.npy"), None, QUICK), work)
    write_hdf5(work / "glove-100-angular.hdf5")
    run_command(smaller(documented("data.gallery=glove-100-angular.hdf5"), None, QUICK), work)
    write_vecs(work / "sift_base.fvecs", GALLERY)
    write_vecs(work / "sift_query.fvecs", QUERIES)
    run_command(smaller(documented("data.gallery=sift_base.fvecs"), {"nlist=1024": "nlist=8"}, QUICK), work)
    factory = documented("method=factory \"method.index_factory='OPQ16,IVF1024,PQ16'\"")
    # OPQ's rotation trains for a minute on 20,000 vectors; 2,000 generated ones show the same command working
    run_command(smaller(factory, {"IVF1024": "IVF16"}, ("data=synthetic_vectors", "data.gallery_size=2000",
                                                        "data.query_size=50", "data.dim=64", *QUICK)), work)
    assert len(mlflow_runs(work, dataset="vectors")) == 3
    assert mlflow_runs(work, method="factory")[0].data.params["method.index_factory"] == "OPQ16,IVF16,PQ16"


def test_a_bad_value_prints_the_documented_line(work):
    readme = documentation_text()
    command = documented("method=ivfpq method.pq_m=7")
    shown = readme.split(f"$ {command}\n", 1)[1].split("\n", 1)[0]
    result = run_command(command, work, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == shown


# --------------------------------------------------------------------------- beyond one process


def test_the_gpu_command_is_refused_on_the_cpu_in_one_line(work):
    command = documented("model=clip extract.devices=4 extract.strategy=ddp extract.precision=16-mixed")
    result = run_command(command, work, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("config error: extract.precision=16-mixed: ")


def test_the_srun_command_composes_and_passes_the_checks(work):
    """No Slurm here: the imgret part of the srun line composes and passes every check before work."""
    command = documented("srun --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 python -m imgret.run")
    from hydra import compose, initialize_config_module

    from imgret.validate import validate_config

    overrides = command.split("python -m imgret.run ", 1)[1].split()
    with initialize_config_module("imgret.conf", version_base="1.3"):
        cfg = compose("config", overrides + ["data=synthetic", "model.pretrained=false"])
    validate_config(cfg)
    assert (cfg.extract.devices, cfg.extract.num_nodes, cfg.extract.strategy) == (4, 2, "ddp")


# --------------------------------------------------------------------------- the study


@pytest.mark.slow  # the README's study sweeps and their report
def test_the_study_experiments_and_the_report(work, subset):
    ivf_study = ("hydra.sweeper.params.nlist='2,8'", "hydra.sweeper.params.nprobe='1,8'")
    # the seed table's four models once, as the docs run it; its other commands on one model each
    for command, extra in [(documented(
            "python -m imgret.run -m +experiment=seed_table data.archive=../shared/data/tiny-imagenet-200.zip"), ()),
                           (documented("+experiment=seed_table model.image_size=64"), ("hydra.sweeper.params.model=mobilenet",)),
                           (documented("+experiment=seed_table data.archive=../shared/data/tiny-imagenet-200.zip "
                                       "model.pretrained=false"), ("hydra.sweeper.params.model=resnet18",)),
                           (documented("+experiment=ivf_study model.image_size=64"), ivf_study),
                           (documented("python -m imgret.run -m +experiment=ivf_study data.archive=../shared/data/"
                                       "tiny-imagenet-200.zip model.pretrained=false model.image_size=64"), ivf_study)]:
        run_command(offline(command, subset, *extra), work)
    zoo = documented("+experiment=index_zoo model.image_size=64")
    run_command(smaller(zoo, None, ("data=synthetic", "model.pretrained=false", "data.gallery_per_class=30", "nlist=4",
                                    "hydra.sweeper.params.effort='1,4'", *QUICK)), work)
    result = run_command(documented("python -m imgret.report"), work)
    assert "report" in result.stdout + result.stderr
    assert any((work / "outputs").rglob("report.html")) or any(work.rglob("report.html"))


@pytest.mark.slow
def test_the_real_feature_studies(work, subset):
    """The README's results on trained features, each command at the subset's size: the full-gallery run, the seed
    table, the IVF study on trained and random features and its report, and the index zoo."""
    run_command(offline(documented("python -m imgret.run model=efficientnet_lite0 data.archive="), subset), work)
    run_command(offline(documented("+experiment=seed_table model=efficientnet_lite0"), subset), work)
    narrow = {"'256,1024'": "'2,8'", "'1,2,4,8,16,32,64'": "'1,8'"}
    for command in (documented("+experiment=ivf_study model=efficientnet_lite0"),
                    documented("model.image_size=64 tracking.experiment=")):
        run_command(smaller(offline(command, subset), narrow), work)
    printed = run_command(documented("python -m imgret.report --experiment ivf_features --all-runs"), work).stdout
    assert "Recall@10 against nprobe for efficientnet_lite0, trained weights" in printed
    assert "and for resnet18, random weights" in printed
    zoo = documented("+experiment=index_zoo model=efficientnet_lite0")
    run_command(smaller(zoo, {OFFLINE_ARCHIVE: "data=synthetic data.gallery_per_class=30"},
                        ("nlist=4", "hydra.sweeper.params.effort='1,4'", *QUICK)), work)
    assert "FAISS IVF-PQ" in run_command(documented("python -m imgret.report"), work).stdout


@pytest.mark.slow
def test_the_libraries_study_on_real_features_and_its_report(work, subset):
    """The README's ANN-libraries study over the real stores, at the subset's size: two libraries, two levels."""
    command = documented("+experiment=ann_libraries model=efficientnet_lite0 data.archive=")
    run_command(offline(command, subset, "method=flat,hnswlib", "level=0,9"), work)
    printed = run_command(documented("python -m imgret.report --experiment ann_libraries_real --all-runs"),
                          work).stdout
    assert "hnswlib HNSW" in printed and "FAISS Flat" in printed


@pytest.mark.slow
def test_the_precision_study_and_its_report(work, subset):
    """The README's precision study at the subset's size (64 px): PyTorch eager fp32 and bf16, OpenVINO fp32, bf16
    and int8 (int8 on PyTorch skipped), then the report's table with recall@10 against the fp32 rows."""
    command = documented("python -m imgret.run -m +experiment=precision_study data.archive=")
    run_command(offline(command, subset, "model.image_size=64", "data.gallery_limit=null"), work)
    printed = run_command(documented("python -m imgret.report --experiment precision_study"), work).stdout
    assert "Precision and backend: what a cheaper extraction costs in retrieval" in printed
    assert "(the reference)" in printed and printed.count("| efficientnet_lite0 | openvino |") == 3


@pytest.mark.slow
def test_the_libraries_study_on_a_million_vectors_and_its_report(work):
    """The README's million-vector libraries study at 5,000 vectors: FAISS IVF and hnswlib, two levels each."""
    command = documented("data.gallery_size=1000000 data.query_size=10000 data.dim=128 nlist=4096")
    run_command(smaller(command, {"data.gallery_size=1000000": "data.gallery_size=5000",
                                  "data.query_size=10000": "data.query_size=100", "nlist=4096": "nlist=32"},
                        ("method=ivf,hnswlib", "level=0,9", *QUICK)), work)
    printed = run_command(documented("python -m imgret.report --experiment ann_libraries_1m --all-runs"), work).stdout
    assert "gallery 5,000 vectors of 128 dimensions, 100 queries" in printed and "hnswlib HNSW" in printed


# --------------------------------------------------------------------------- the demo and the API


@pytest.mark.slow
def test_the_demo_curl_load_and_the_python_api(work, subset, tiny_subset_zip):
    from imgret.embed.ranks import free_port

    port = free_port()
    serve = documented("python -m imgret.serve data.archive=")
    server = subprocess.Popen(["bash", "-c", "exec " + offline(serve, subset, f"serve.port={port}",
                                                               "serve.indexes.ivf.nlist=8")],
                              cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=environment())
    try:
        deadline, url = time.monotonic() + 240, f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(0.5)
        indexes = json.load(urllib.request.urlopen(f"{url}/api/indexes"))
        ivf = next(i["name"] for i in indexes["indexes"] if i["name"].startswith("ivf") and "nprobe=1" in i["name"])
        import zipfile

        with zipfile.ZipFile(tiny_subset_zip[0]) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".JPEG") and "/val/" in n)
            (work / "query.jpg").write_bytes(archive.read(name))
        curl = documented("curl -F image=@query.jpg")
        found = json.loads(run_command(smaller(curl, {"index=ivf nlist=256 nprobe=1": f"index={ivf}",
                                                      "http://127.0.0.1:8000": url}), work).stdout)
        assert len(found["results"]) == 5
        load = documented("python -m imgret.serve.load --requests 200 --concurrency 8 --image query.jpg")
        printed = run_command(smaller(load, {"--requests 200": "--requests 40"}, ("--url", url)), work).stdout
        assert "40 requests at concurrency 8" in printed and " 0 errors" in printed
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    in_conf = documented("python -m imgret.serve data.gallery_limit=20")
    assert in_conf.split("serve ", 1)[1] in serve, "the config comment's example is the README's without the archive"

    api = documented("from imgret.api import load_image, open_retriever")
    api = api.replace('"data.archive=../shared/data/tiny-imagenet-200.zip"',
                      ", ".join(f'"{o}"' for o in subset) + ', "serve.indexes.ivf.nlist=8"')
    api = api.replace('"ivf nlist=256 nprobe=1"', f'"{ivf}"')
    printed = run_python(api, work).stdout
    classes, seconds = printed.rsplit("]", 1)
    assert len(ast.literal_eval(classes + "]")) == 10 and float(seconds) > 0


# --------------------------------------------------------------------------- MLflow


@pytest.mark.slow
def test_mlflow_ui_and_the_runs_table(work):
    if not mlflow_runs(work):
        run_command(smaller(documented("python -m imgret.run data=synthetic model.pretrained=false"), None, QUICK),
                    work)
    from imgret.embed.ranks import free_port

    port = free_port()
    ui = documented("mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")
    server = subprocess.Popen(["bash", "-c", f"exec {ui} --port {port}"], cwd=work, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=environment(),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    table = run_python(documented("mlflow.search_runs(experiment_names=[\"imgret\"]"), work).stdout
    assert "tags.model" in table and "metrics.recall_at_10" in table
