"""Filtered search on a small real store (real Tiny-ImageNet images embedded by the trained EfficientNet-Lite0): the
filtered ground truth equals a numpy computation over each query's allowed rows; every method at its most exhaustive
level reaches tie-aware recall@10 >= 0.99 against it and returns only allowed rows; FAISS's own filter returns what
bare faiss returns with an IDSelector; bad filters are refused in one line before any work."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, PROJECT_ROOT
from documented import docs_study, documented, run_command, run_small
from imgret.index.build import build_index
from imgret.index.exact_filtered import filtered_top_k
from imgret.index.filters import ATTRIBUTE_RANGE, RowKeys, keep_allowed, attribute_filter, label_filter, row_attributes
from imgret.index.groundtruth import exact_filtered_top_k
from imgret.index.methods import METHODS
from imgret.measure.metrics import recall_at_ties

K = 10


def numpy_filtered_top_k(gallery, queries, allowed_of, k):
    """Each query's k best allowed rows by float64 products, ties broken by the lower id."""
    ids = np.full((len(queries), k), -1)
    for q, query in enumerate(queries):
        allowed = np.flatnonzero(allowed_of(q))
        similarities = gallery[allowed].astype(np.float64) @ query.astype(np.float64)
        best = allowed[np.lexsort((allowed, -similarities))][:k]
        ids[q, :len(best)] = best
    return ids


def filters_of(stores):
    gallery, queries = stores.gallery, stores.queries
    return {"label": label_filter(gallery.labels, queries.labels),
            "attribute": attribute_filter(len(gallery), len(queries), 0.1, seed=0)}


def test_attributes_are_reproducible_from_the_row_and_seed_and_keep_the_share_asked():
    assert np.array_equal(row_attributes(1000, 3), row_attributes(5000, 3)[:1000])  # a row's attribute is its own
    assert not np.array_equal(row_attributes(1000, 3), row_attributes(1000, 4))
    rows = attribute_filter(200_000, 50, 0.01, seed=0)
    shares = [rows.allowed(q).mean() for q in range(50)]
    assert abs(np.mean(shares) - 0.01) < 0.002 and rows.selectivity == pytest.approx(np.mean(shares), abs=1e-12)
    assert rows.selectivity != 0.01  # the realised share, not the nominal width
    assert np.all(rows.high - rows.low == 0.01 * ATTRIBUTE_RANGE) and len(set(rows.low.tolist())) > 40


@pytest.mark.parametrize("kind", ["label", "attribute"])
def test_the_filtered_ground_truth_equals_numpy_over_each_query_s_allowed_rows(kind, real_stores):
    gallery, queries = np.array(real_stores.gallery.vectors), np.array(real_stores.queries.vectors)
    if kind == "label":
        labels, query_labels = real_stores.gallery.labels, real_stores.queries.labels
        rows = label_filter(labels, query_labels)
        allowed_of = lambda q: labels == query_labels[q]  # noqa: E731
        assert rows.selectivity == pytest.approx(1 / 20)
    else:
        rows = attribute_filter(len(gallery), len(queries), 0.1, seed=0)
        allowed_of = rows.allowed
    scores, ids = exact_filtered_top_k(gallery, queries, rows, K, block_rows=97, query_chunk=7)
    assert np.array_equal(ids, numpy_filtered_top_k(gallery, queries, allowed_of, K))
    assert np.allclose(scores, np.take_along_axis(queries @ gallery.T, ids, 1), atol=1e-5)


@pytest.mark.parametrize("share", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_exact_filtered_search_equals_numpy_whether_it_gathers_or_masks(share, tmp_path):
    """Brute force's filter, one query at a time and in batches, over a gallery in memory (its rows in key order) and
    over a memory-mapped one (a narrow filter's rows gathered, a wide one scanned in blocks with the others masked):
    numpy's float64 top-10 over each query's allowed rows (-1 past them)."""
    rng = np.random.default_rng(7)
    gallery = rng.normal(size=(3000, 24)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[rng.choice(3000, 60, replace=False)] + 0.1 * rng.normal(size=(60, 24)).astype(np.float32)
    rows = attribute_filter(len(gallery), len(queries), share, seed=3)
    expected = numpy_filtered_top_k(gallery, queries, rows.allowed, K)
    mapped = np.lib.format.open_memmap(tmp_path / "gallery.npy", mode="w+", dtype=np.float32, shape=gallery.shape)
    mapped[:] = gallery
    for source, resident in ((gallery, 1 << 30), (np.load(tmp_path / "gallery.npy", mmap_mode="r"), 0)):
        batch = filtered_top_k(source, queries, K, rows, np.arange(len(queries)), query_chunk=7, resident_bytes=resident)
        single = [filtered_top_k(source, queries[q:q + 1], K, rows, np.array([q]), resident_bytes=resident)
                  for q in range(len(queries))]
        assert np.array_equal(batch[1], expected), (share, resident)
        assert np.array_equal(np.concatenate([ids for _, ids in single]), expected), (share, resident)
        assert np.all(np.isneginf(batch[0][expected < 0]))


def test_a_database_refuses_a_filter_over_keys_it_does_not_hold(real_stores, tmp_path):
    gallery = np.array(real_stores.gallery.vectors)
    built = build_index(compose_method("sqlite_vec").method, gallery, tmp_path / "cache", "real")  # no classes given
    try:
        rows = filters_of(real_stores)["label"]
        with pytest.raises(Exception, match="holds other label keys with its rows than the filter reads"):
            METHODS["sqlite_vec"].search_filtered(built.native, np.array(real_stores.queries.vectors), K, {}, 1, rows,
                                                  np.arange(len(real_stores.queries)))
    finally:
        built.close()


def test_the_filtered_study_sweeps_every_engine_with_its_own_way_of_filtering():
    """Every engine of the engines study (experiments/engines.yaml says what it leaves to other studies), brute force
    (the exact baseline) among them, on one search thread and one client."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=filtered"], return_hydra_config=True)
    swept = set(str(cfg.hydra.sweeper.params.method).split(","))
    assert swept == set(METHODS) - {"factory", "ivfpq", "ivfsq", "sq", "hnsw_sq", "binary", "diskann_disk"}, swept
    assert cfg.search.threads == 1 and cfg.search.clients is None and cfg.tracking.experiment == "filtered"


def compose_method(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"method={name}", "nlist=16", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if name != "factory"])
def test_every_method_searches_under_a_filter_returning_only_allowed_rows(name, real_stores, tmp_path):
    import torch

    method = METHODS[name]
    try:
        method.library()
    except Exception as missing:
        pytest.skip(str(missing))
    gallery, queries = np.array(real_stores.gallery.vectors), np.array(real_stores.queries.vectors)
    levels = compose_method(name).method.get("levels")
    cfg = compose_method(name, f"level={len(levels) - 1}" if levels else "level=null")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a graph built on one thread inserts in one order
    try:  # a database stores the rows' classes and attributes with them, as a run's does
        built = build_index(cfg.method, gallery, tmp_path / "cache", "real",
                            row_keys=RowKeys.of(real_stores.gallery.labels))
    finally:
        torch.set_num_threads(threads)
    try:
        for kind, rows in filters_of(real_stores).items():
            scores, ids = method.search_filtered(built.native, queries, K, method.query_setting(cfg.method), 1, rows,
                                                 np.arange(len(queries)))
            plan = method.filter_plan(built.native, queries, K, rows)
            if type(built.native).__dict__.get("plan"):  # an engine that plans (SQL's EXPLAIN) says how it did
                assert plan and "queries)" in plan, (name, plan)
            assert ids.shape == (len(queries), K) and ids.dtype == np.int64
            assert np.all(rows.allows(np.arange(len(queries))[:, None], ids) | (ids < 0)), f"{name}: a row not allowed"
            _, truth = exact_filtered_top_k(gallery, queries, rows, K)
            truth_scores = np.take_along_axis(queries @ gallery.T, truth, 1)
            found_scores = np.where(ids >= 0, np.take_along_axis(queries @ gallery.T, np.maximum(ids, 0), 1), -np.inf)
            recall = recall_at_ties(found_scores, truth_scores, K, 1e-6)
            if method.filter_recall_bound:  # it filters its index's k results: exactly those, the allowed ones kept
                unfiltered = method.search(built.native, queries, K, method.query_setting(cfg.method), 1)
                kept = keep_allowed(rows, np.arange(len(queries)), *unfiltered, K)[1]
                assert np.array_equal(np.sort(ids, axis=1), np.sort(kept, axis=1)), name
            elif method.recall_bound:  # its codes, not a setting, bound its recall
                assert recall > 0.5, (name, kind, recall)
            else:
                assert recall >= 0.99, f"{name} ({method.filter_mode}) under the {kind} filter: recall@10 {recall}"
    finally:
        built.close()


def test_faiss_s_own_filter_returns_what_bare_faiss_returns_with_an_id_selector(real_stores):
    import faiss

    gallery, queries = np.array(real_stores.gallery.vectors), np.array(real_stores.queries.vectors)
    rows = filters_of(real_stores)["attribute"]
    for name, params in (("hnsw", lambda sel: faiss.SearchParametersHNSW(sel=sel, efSearch=16)),
                         ("ivf", lambda sel: faiss.SearchParametersIVF(sel=sel, nprobe=2)),
                         ("flat", lambda sel: faiss.SearchParameters(sel=sel))):
        cfg = compose_method(name, "ef_search=16", "nprobe=2")
        built = build_index(cfg.method, gallery)
        _, ids = METHODS[name].search_filtered(built.native, queries, K, METHODS[name].query_setting(cfg.method), 1,
                                               rows, np.arange(len(queries)))
        for q in range(len(queries)):
            selector = faiss.IDSelectorBatch(np.flatnonzero(rows.allowed(q)).astype(np.int64))
            bare = built.native.search(queries[q:q + 1], K, params=params(selector))[1][0]
            assert np.array_equal(ids[q], bare), (name, q)


def test_the_documented_filtered_run_logs_its_filtered_recall(tmp_path):
    run = run_small(documented("method=hnswlib filter=attribute filter.selectivity=0.05"), tmp_path,
                    "search.latency_queries=50")
    realised = attribute_filter(int(run["params.gallery_size"]), int(run["params.query_size"]), 0.05, seed=0)
    shares = [realised.allowed(q).mean() for q in range(int(run["params.query_size"]))]
    assert run["metrics.filter_selectivity"] == pytest.approx(np.mean(shares), abs=1e-9)
    assert run["metrics.recall_at_10"] > 0.9
    assert run["tags.filter_mode"].startswith("its own filter") and "filter-attribute0.05" in run["tags.mlflow.runName"]


@pytest.mark.slow
def test_a_filter_narrower_than_k_is_measured_over_the_neighbours_that_exist_and_recomputed_from_the_run(tmp_path):
    """The documented narrow filter (about 4 allowed rows a query, k=10): the run's saved exact neighbours equal numpy's
    float64 filtered top-10, and its logged recall equals the documented recomputation from its artifacts alone and a
    plain numpy count over the neighbours that exist (where counting the -1 padding as hits would credit each query
    with the neighbours that do not exist)."""
    from mlflow.tracking import MlflowClient

    from imgret.embed.store import EmbeddingStore

    run = run_small(documented("filter.selectivity=0.0002"), tmp_path, "search.latency_queries=50")
    folder = MlflowClient().download_artifacts(run["run_id"], "", str(tmp_path / "artifacts"))
    found, exact = np.load(f"{folder}/found_ids.npy"), np.load(f"{folder}/exact_ids.npy")
    gallery = np.asarray(EmbeddingStore.open(__import__("pathlib").Path(run["tags.gallery_store"])).vectors)
    queries = np.asarray(EmbeddingStore.open(__import__("pathlib").Path(run["tags.query_store"])).vectors)
    rows = attribute_filter(len(gallery), len(queries), 0.0002, seed=0)
    assert np.array_equal(exact, numpy_filtered_top_k(gallery, queries, rows.allowed, K))
    exist = (exact >= 0).sum(axis=1)
    assert (exist < K).mean() > 0.9  # nearly every query has fewer allowed rows than k
    hits = np.array([len(set(f.tolist()) & set(e[e >= 0].tolist())) for f, e in zip(found, exact)])
    by_numpy = float(np.mean(hits[exist > 0] / exist[exist > 0]))
    assert run["metrics.recall_at_10"] == pytest.approx(by_numpy, abs=1e-12)
    assert run["metrics.queries_without_neighbours"] == (exist == 0).sum()
    snippet = documented("mlflow.artifacts.download_artifacts").replace(
        "sqlite:///mlruns/mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = [[float(word) for word in line.split() if word[0].isdigit()] for line in done.stdout.splitlines()]
    assert len(figures) == 2 and len(figures[0]) == 3 and len(figures[1]) == 2, done.stdout
    assert figures[0][0] == pytest.approx(by_numpy, abs=1e-12) and figures[0][1:] == pytest.approx([by_numpy] * 2)
    assert figures[1][0] == pytest.approx(figures[1][1], abs=1e-12)  # tie-aware, logged and recomputed


@pytest.mark.parametrize("overrides, line", [
    (["filter=attribute", "filter.selectivity=1.5"],
     "config error: filter.selectivity=1.5: the share of the gallery each query may return, in (0, 1]"),
    (["filter=attribute", "filter.selectivity=0"],
     "config error: filter.selectivity=0: the share of the gallery each query may return, in (0, 1]"),
    (["filter=label", "data=vectors", "data.gallery=missing.hdf5"],
     "config error: filter=label: none or attribute for data=vectors, whose vectors have no classes"),
])
def test_a_bad_filter_is_refused_in_one_line_before_any_work(overrides, line, tmp_path):
    done = subprocess.run([sys.executable, "-m", "imgret.run", "data=synthetic_vectors", "method=flat", *overrides,
                           f"paths.cache={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == line, done.stderr[-1000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_the_filtered_study_and_its_report(tmp_path, tiny_subset_zip):
    """The docs' filtered study at the subset's size (4 classes: a label filter keeps a quarter of the gallery), two
    methods, the attribute filter at one selectivity, then the report's panels and table."""
    command = documented("+experiment=filtered model=efficientnet_lite0 data.archive=")
    work = docs_study(command, tmp_path, tiny_subset_zip, "method=brute,hnsw", "level=0,9", "filter.selectivity=null,0.5")
    printed = run_command(documented("python -m imgret.report --experiment filtered"), work).stdout
    assert "Filtered search: recall against speed at each selectivity" in printed
    assert "| the query's own class (25.00% of the gallery on average) | brute force | its own filter" in printed
    assert re.search(r"\| an attribute range of 50\.00% of its values, keeping \d\d\.\d\d% of the gallery \| brute force \|",
                     printed), printed
