"""A gallery larger than memory: IVF-PQ's candidates re-ranked from the gallery store (method.refine_factor), and a
whole run inside a memory cgroup capped below the gallery's size (tools/memory_cap.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import clustered_vectors
from imgret.errors import ConfigError
from imgret.index.build import build_index
from imgret.index.filters import label_filter
from imgret.index.filtered import FilteredSearch
from imgret.measure.metrics import recall_at
from imgret.run import run_tracked
from documented import documented, run_command, sandbox, smaller
from test_faults import all_runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import memory_cap  # noqa: E402


def _mapped_gallery(tmp_path: Path, n: int = 20000, dim: int = 64) -> np.ndarray:
    np.save(tmp_path / "g.npy", clustered_vectors(n, dim, clusters=50, seed=11, spread=0.5))
    return np.load(tmp_path / "g.npy", mmap_mode="r")


def _reference_refine(index: faiss.Index, gallery: np.ndarray, queries: np.ndarray, k: int, factor: int,
                      nprobe: int) -> np.ndarray:
    """Bare faiss's best k x factor, re-ranked by numpy in float64 (ties by faiss's order)."""
    _, candidates = index.search(queries, k * factor, params=faiss.SearchParametersIVF(nprobe=nprobe))
    exact = np.einsum("qcd,qd->qc", np.asarray(gallery, dtype=np.float64)[candidates], queries.astype(np.float64))
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, axis=1)


def test_refined_ivfpq_reranks_its_candidates_by_the_stored_vectors(tmp_path):
    gallery = _mapped_gallery(tmp_path)
    queries = np.ascontiguousarray(gallery[:200] + 0.05 * clustered_vectors(200, 64, clusters=3, seed=2))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(queries.astype(np.float64) @ np.asarray(gallery, dtype=np.float64).T), axis=1)[:, :10]
    settings = {"name": "ivfpq", "nlist": 32, "nprobe": 8, "pq_m": 8, "pq_nbits": 8, "train_size": None,
                "on_disk": False}
    plain = build_index(OmegaConf.create({**settings, "refine_factor": 1}), gallery, tmp_path / "cache", "g")
    refined = build_index(OmegaConf.create({**settings, "refine_factor": 8}), gallery, tmp_path / "cache", "g")
    assert refined.reused, "refine_factor is a query setting: the same index"
    scores, ids = refined.index.search(queries, 10)
    assert np.array_equal(ids, _reference_refine(refined.native, gallery, queries, 10, 8, 8))
    assert np.allclose(scores, np.einsum("qkd,qd->qk", np.asarray(gallery)[ids], queries), atol=1e-5)
    plain_recall, refined_recall = recall_at(plain.index.search(queries, 10)[1], exact, 10), recall_at(ids, exact, 10)
    assert refined_recall > plain_recall + 0.3, (plain_recall, refined_recall)
    other = refined.at({"nprobe": 32, "refine_factor": 2})  # another setting of the same index: refined too
    assert np.array_equal(other.search(queries, 10)[1], _reference_refine(refined.native, gallery, queries, 10, 2, 32))
    assert refined.index.nbytes == plain.index.nbytes, "the store is not counted in the index"


def test_refine_under_a_filter_returns_allowed_rows_reranked(tmp_path):
    gallery = _mapped_gallery(tmp_path, n=5000, dim=32)
    labels = np.arange(len(gallery)) % 7
    queries = np.ascontiguousarray(gallery[:40])
    row_filter = label_filter(labels, np.arange(40) % 7)
    built = build_index(OmegaConf.create({"name": "ivfpq", "nlist": 16, "nprobe": 16, "pq_m": 8, "pq_nbits": 8,
                                          "train_size": None, "on_disk": False, "refine_factor": 4}),
                        gallery, tmp_path / "cache", "g")
    scores, ids = FilteredSearch(built, {"nprobe": 16, "refine_factor": 4}, row_filter, queries).search(queries, 10)
    assert (labels[ids] == (np.arange(40) % 7)[:, None]).all()
    assert np.array_equal(ids[:, 0], np.arange(40)), "each query's own row is the best after re-ranking"
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_a_bad_refine_factor_is_refused_before_any_work(make_cfg):
    cfg = make_cfg("data=synthetic_vectors", "method=ivfpq", "method.refine_factor=0")
    with pytest.raises(ConfigError, match="method.refine_factor.*0.*whole number >= 1"):
        run_tracked(cfg)
    assert not all_runs(cfg.tracking.uri)


@pytest.mark.slow
@pytest.mark.skipif(memory_cap.unavailable() is not None, reason=f"no memory cgroup: {memory_cap.unavailable()}")
def test_the_documented_beyond_memory_sweeps_run_under_a_cap_smaller_than_the_gallery(tmp_path):
    """The 10M study's commands at a small size: the gallery store (1,000,000 x 512 float32, 2.05 GB) is larger than
    the cap (1.75 GiB), of which the process's own imports take about half. IVF-Flat keeps its lists on disk; IVF-PQ
    keeps codes in memory and re-ranks from the store."""
    cap, gallery_bytes = 1792 * 2 ** 20, 1_000_000 * 512 * 4
    assert cap < gallery_bytes
    work = sandbox(tmp_path)
    small = ("data.gallery_size=1000000", "data.query_size=50", "nlist=128", "search.latency_queries=10",
             "search.warmup_queries=2")
    sweeps = {documented("+experiment=beyond_memory method=ivfpq"):
              {"nprobe=8,16,32,64 method.refine_factor=1,10,40": "nprobe=32 method.refine_factor=1,20"},
              documented("+experiment=beyond_memory method=ivf method.on_disk=true"): {"nprobe=2,4,8,16,32": "nprobe=4"}}
    for command, replacements in sweeps.items():
        done = run_command(smaller(command, {"tools/memory_cap.py 8G": f"{ROOT / 'tools' / 'memory_cap.py'} {cap}",
                                             **replacements}, small), work, timeout=900, in_process=False)
        assert "OOM kills 0, exit 0" in done.stderr.splitlines()[-1], done.stderr[-500:]
    report = run_command(documented("python -m imgret.report --experiment beyond_memory"), work, in_process=False)
    client = MlflowClient(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("beyond_memory")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])
            if "nprobe" in run.info.run_name}
    assert len(runs) == 3 and all(run.info.status == "FINISHED" for run in runs.values()), sorted(runs)
    recall = {name: run.data.metrics["recall_at_10"] for name, run in runs.items()}
    plain, refined = (next(r for n, r in recall.items() if "ivfpq" in n and f"refine_factor{f}" in n) for f in (1, 20))
    assert refined > plain + 0.1 and refined > 0.85, recall
    assert next(r for n, r in recall.items() if n.startswith("vectors-ivf-")) > 0.85, recall
    assert all(run.data.params["gallery_size"] == "1000000" for run in runs.values())
    assert "| vectors | FAISS IVF-PQ |" in report.stdout and "| vectors | FAISS IVF |" in report.stdout, report.stdout


def test_the_memory_cap_tool_reports_an_oom_kill_and_refuses_bad_caps(tmp_path):
    if memory_cap.unavailable():
        pytest.skip(f"no memory cgroup: {memory_cap.unavailable()}")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "memory_cap.py"), "100M", "--", sys.executable, "-c",
                           "import numpy; a = numpy.ones(40_000_000); print(a.sum())"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 137 and "OOM kills 1" in done.stderr, done.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "memory_cap.py"), "lots", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cap 'lots': a size such as 8G" in bad.stderr


def test_a_batch_is_reranked_a_block_of_queries_at_a_time_as_numpy_in_float64_ranks_it(tmp_path):
    import tracemalloc

    from imgret.index.refine import rerank

    gallery = _mapped_gallery(tmp_path)
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((1000, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    candidates = rng.integers(0, len(gallery), (1000, 200))
    candidates[::7, -30:] = -1  # some queries had fewer candidates
    tracemalloc.start()
    try:
        scores, ids = rerank(gallery, queries, candidates, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    exact = np.einsum("qcd,qd->qc", np.asarray(gallery, dtype=np.float64)[candidates], queries.astype(np.float64))
    exact[candidates < 0] = -np.inf
    expected = np.take_along_axis(candidates, np.argsort(-exact, axis=1, kind="stable")[:, :10], axis=1)
    assert np.mean(ids == expected) >= 0.999, "the same ranking as float64 numpy, but for float32's near-ties"
    every_candidate_row = candidates.size * gallery.shape[1] * 4
    assert peak < every_candidate_row / 2, f"{peak:,} bytes traced: the batch's candidate rows held at once"
