import re
import faiss
import numpy as np
import pytest
from omegaconf import OmegaConf

import imgret.index.groundtruth
from conftest import clustered_vectors, write_store
from imgret.errors import ConfigError, allowed
from imgret.index.groundtruth import exact_ground_truth, ground_truth_path
from imgret.index.build import build_index
from imgret.index.brute import BruteForceIndex
from imgret.index.methods import METHODS, MethodSettings, validate_search
from imgret.measure.metrics import AT_10_METRICS, latency_percentiles, precision_at, recall_at
from imgret.measure.search import latency_sample, search_threads, timed_search

GALLERY = clustered_vectors(4000, 64, clusters=32, seed=1)
QUERIES = clustered_vectors(4200, 64, clusters=32, seed=1)[4000:]  # same centres, unseen points


def method(name, **params):
    return OmegaConf.create({"name": name, **params})


def exact_ids(k=10):
    flat = faiss.IndexFlatIP(GALLERY.shape[1])
    flat.add(GALLERY)
    return flat.search(QUERIES, k)[1]


def recall_of(method_cfg, k=10):
    index = build_index(method_cfg, GALLERY).index
    return recall_at(index.search(QUERIES, k)[1], exact_ids(k), k)


def test_brute_force_returns_the_same_neighbours_as_faiss_flat():
    scores, ids = BruteForceIndex(GALLERY, query_chunk=64).search(QUERIES, 10)
    flat = faiss.IndexFlatIP(64)
    flat.add(GALLERY)
    flat_scores, flat_ids = flat.search(QUERIES, 10)
    assert np.array_equal(ids, flat_ids)
    assert np.allclose(scores, flat_scores, atol=1e-5)


@pytest.mark.parametrize("method_cfg", [method("brute"), method("flat"), method("ivf", nlist=16, nprobe=16)],
                         ids=["brute", "flat", "ivf-nprobe=nlist"])
def test_exact_settings_have_recall_one(method_cfg):
    assert recall_of(method_cfg) == 1.0


def test_ivf_with_one_probe_misses_neighbours_on_clustered_data():
    one_probe = recall_of(method("ivf", nlist=64, nprobe=1))
    more_probes = recall_of(method("ivf", nlist=64, nprobe=8))
    assert one_probe < 1.0
    assert one_probe < more_probes  # nprobe is really applied


def test_build_reports_time_and_size():
    built = build_index(method("ivf", nlist=16, nprobe=4), GALLERY)
    assert built.build_s > 0 and not built.reused and built.path is None  # no cache folder given
    assert built.index.nbytes > GALLERY.nbytes  # the vectors plus ids and centroids
    assert built.index.index.nprobe == 4


@pytest.mark.parametrize("method_cfg, k, match", [
    (method("ivf", nlist=16, nprobe=32), 10, "^nprobe=32: a whole number from 1 to nlist \\(16\\)$"),
    (method("ivf", nlist=5000, nprobe=1), 10, "^nlist=5000: a whole number from 1 to the gallery size \\(4000\\)$"),
    (method("flat"), 4001, "^k=4001: a whole number from 1 to the gallery size \\(4000\\)$"),
    (method("nosuchmethod"), 10, "^method=nosuchmethod: one of " + re.escape(allowed(METHODS)) + "$"),
    (method("ivfpq", nlist=16, nprobe=1, pq_m=8, pq_nbits=20), 10, "^method.pq_nbits=20: a whole number of bits from 1 to 16$"),
    (method("hnsw", hnsw_m=0, ef_construction=40, ef_search=16), 10, "^method.hnsw_m=0: a whole number >= 1$"),
    (method("factory", index_factory="IVF16,Flatt", search_params=""), 10, "^method.index_factory=IVF16,Flatt: a faiss"),
    (method("ivf", nlist=16, nprobe=1, nprob=2), 10,
     "^method.nprob=2: a parameter of method=ivf: nlist, nprobe, on_disk, train_size$"),
])
def test_bad_search_values_fail_early_with_what_is_allowed(method_cfg, k, match):
    with pytest.raises(ConfigError, match=match):
        validate_search(method_cfg, k, gallery_size=4000)


def test_a_method_section_is_typed_once_frozen_and_the_same_from_a_config_or_a_dict():
    section = OmegaConf.create({"name": "ivf", "nlist": 16, "nprobe": 4, "levels": [1, 2]})
    settings = MethodSettings.of(section)
    assert MethodSettings.of(settings) is settings and settings == MethodSettings.of(dict(section))
    assert settings.method is METHODS["ivf"] and settings.name == "ivf" and settings["nprobe"] == 4
    assert settings.replaced(nprobe=8)["nprobe"] == 8 and settings["nprobe"] == 4
    with pytest.raises(AttributeError):
        settings.nprobe = 8


def test_too_few_points_per_list_is_a_warning():
    with pytest.warns(UserWarning, match="200 centroids get 20.0 training points each"):
        validate_search(method("ivf", nlist=200, nprobe=1), 10, gallery_size=4000)


def test_recall_counts_overlap_not_order_and_ignores_missing_results():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 1], [4, -1, 9]])
    assert recall_at(found, exact, 3) == pytest.approx((3 + 1) / 6)
    assert recall_at(found, exact, 1) == pytest.approx((0 + 1) / 2)


def test_precision_is_the_share_of_results_with_the_query_class():
    gallery_labels = np.array([0, 0, 1, 1])
    found = np.array([[0, 1, 2], [2, -1, 0]])
    assert precision_at(found, gallery_labels, np.array([0, 1]), 3) == pytest.approx((2 + 1) / 6)


def test_latency_percentiles():
    p = latency_percentiles(np.arange(1, 101))
    assert p[50] == pytest.approx(50.5) and p[99] == pytest.approx(99.01)


def test_timed_search_takes_at_least_the_configured_number_of_single_queries():
    index = build_index(method("flat"), GALLERY).index
    run = timed_search(index, QUERIES[:30], 5, latency_queries=100, warmup_queries=3, progress=False)
    assert run.ids.shape == (30, 5) and len(run.latencies_ms) == 100
    assert (run.latencies_ms > 0).all() and len(run.batch_seconds) == 3
    assert run.best_batch_seconds == min(run.batch_seconds) > 0


def test_the_latency_sample_is_random_and_disjoint_from_the_warm_up():
    warmup, timed = latency_sample(1000, 200, 50, seed=0)
    assert len(warmup) == 50 and len(timed) == 200 and len(set(timed.tolist())) == 200
    assert not set(warmup.tolist()) & set(timed.tolist())
    assert timed.tolist() != list(range(50, 250)) and warmup.tolist() != list(range(50))  # not the first queries
    assert np.array_equal(latency_sample(1000, 200, 50, seed=0)[1], timed)  # the seed fixes it
    few_warmup, few = latency_sample(5, 12, 50)  # fewer queries than the warm-up: one is still timed
    assert len(few_warmup) == 4 and set(few.tolist()) == set(range(5)) - set(few_warmup.tolist())


def test_search_threads_fix_and_restore_faiss_and_torch_threads():
    import faiss
    import torch

    before = (faiss.omp_get_max_threads(), torch.get_num_threads())
    with search_threads(1):
        assert faiss.omp_get_max_threads() == 1 and torch.get_num_threads() == 1
    assert (faiss.omp_get_max_threads(), torch.get_num_threads()) == before


def test_a_run_times_search_at_k_and_reports_only_what_that_search_found(make_cfg):
    from imgret.run import run_tracked
    from test_run import runs_of

    cfg = make_cfg("data=synthetic", "model.pretrained=false", "model.image_size=32", "method=hnsw", "k=1",
                   "ef_search=1", "search.threads=1", "search.repeats=4")
    metrics = run_tracked(cfg)
    _, runs = runs_of(cfg.tracking.uri)
    tags = runs[0].data.tags
    repeats = [float(qps) for qps in tags["batch_qps_repeats"].split(", ")]
    assert len(repeats) == 4 and metrics["search_qps_batch"] == pytest.approx(max(repeats), rel=1e-3)
    assert tags["search_threads"] == "1"
    # every figure comes from the timed search: at k=1 there is no recall@10 (nor precision@10) to report
    assert not set(AT_10_METRICS) & set(metrics) and not set(AT_10_METRICS) & set(runs[0].data.metrics)
    assert metrics["recall_at_k"] == metrics["recall_at_1"] == runs[0].data.metrics["recall_at_1"]


def test_ground_truth_is_computed_once_cached_and_verified(tmp_path, monkeypatch):
    stores = [write_store(tmp_path / name, vectors) for name, vectors in [("gallery", GALLERY), ("queries", QUERIES)]]
    truth = exact_ground_truth(*stores, k=10, cache_dir=tmp_path / "cache")
    assert np.array_equal(truth.ids, exact_ids(10))
    cached = ground_truth_path(tmp_path / "cache", *stores, k=10)
    assert cached.is_file() and cached.with_suffix(".json").is_file()

    def no_search(*args, **kwargs):
        raise AssertionError("a cached ground truth must not be computed again")

    with monkeypatch.context() as patch:
        patch.setattr(imgret.index.groundtruth, "exact_top_k", no_search)
        assert np.array_equal(exact_ground_truth(*stores, k=10, cache_dir=tmp_path / "cache").ids, truth.ids)

    # altered after it was written (same size, other bytes): detected, moved aside, computed again
    np.savez(cached, ids=truth.ids * 0, scores=truth.scores)
    again = exact_ground_truth(*stores, k=10, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.ids, exact_ids(10))
    assert len(list((cached.parent / ".damaged").iterdir())) >= 1
    # truncated: the same
    cached.write_bytes(cached.read_bytes()[:100])
    assert np.array_equal(exact_ground_truth(*stores, k=10, cache_dir=tmp_path / "cache").ids, exact_ids(10))


def test_the_ground_truth_is_exact_in_float64_streamed_in_blocks_and_versioned(tmp_path):
    from imgret.index.groundtruth import VERSION, exact_top_k

    rng = np.random.default_rng(7)
    gallery = clustered_vectors(5000, 32, clusters=8, seed=7)
    gallery[100] = gallery[99]  # an exact tie: broken by the lower id
    gallery[4000] = gallery[99] + np.float32(1e-7) * rng.normal(size=32).astype(np.float32)  # a float32 near-tie
    queries = np.concatenate([gallery[99:100] + 1e-3, clustered_vectors(5100, 32, clusters=8, seed=7)[5000:]])
    scores, ids = exact_top_k(gallery, queries, 10, block_rows=700, query_chunk=33, progress=False)
    exact = queries.astype(np.float64) @ gallery.astype(np.float64).T
    expected = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    assert np.array_equal(ids, expected), "the same ids, in float64's order, whatever the block sizes"
    assert np.allclose(scores, np.take_along_axis(exact, expected, axis=1), atol=1e-7)
    store = write_store(tmp_path / "g", gallery)
    assert ground_truth_path(tmp_path, store, store, 10).name.endswith(f"__k10__v{VERSION}.npz")
