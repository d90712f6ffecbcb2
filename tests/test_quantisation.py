"""Quantised indexes (docs/how-to/quantisation.md): the codes each engine keeps, chosen by `quantisation`, and the
re-ranking by the full rows, `refine_factor`: imgret's ids equal the engine's own calls on the quantised index, the
index's bytes shrink with the codes, re-ranking recovers recall, a code an engine has not is refused in one line;
the study's command and its report's table."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, PROJECT_ROOT
from documented import docs_study, documented, run_command, run_small
from imgret.index.build import build_index
from imgret.index.methods import METHODS
from imgret.index.refine import Refined
from imgret.measure.metrics import recall_at_ties

K = 10


def compose_method(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"method={name}", "nlist=16", *overrides]).method


def recall(found: np.ndarray, gallery: np.ndarray, queries: np.ndarray) -> float:
    similarities = queries @ gallery.T
    found_scores = np.where(found >= 0, np.take_along_axis(similarities, np.maximum(found, 0), 1), -np.inf)
    return recall_at_ties(found_scores, np.sort(similarities, axis=1)[:, ::-1][:, :K], K, 1e-6)


@pytest.mark.slow  # a run in a process of its own
def test_the_documented_quantised_run_keeps_two_bytes_a_dimension_and_re_ranks_to_the_exact_neighbours(tmp_path):
    run = run_small(documented("method=sq quantisation=fp16 refine_factor=4"), tmp_path, "search.latency_queries=50")
    assert run["params.method.quantisation"] == "fp16" and run["params.method.refine_factor"] == "4"
    per_row = run["metrics.index_bytes"] / float(run["params.gallery_size"])
    assert 2 * 64 <= per_row < 2 * 64 + 1, per_row  # fp16 codes: two bytes a dimension, and a header
    assert run["metrics.recall_at_10"] >= 0.99


def test_a_code_a_method_has_not_is_refused_in_one_line_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "-m", "imgret.run", "data=synthetic_vectors", "method=usearch",
                           "quantisation=pq", f"paths.cache={tmp_path / 'cache'}",
                           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-1000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "config error: quantisation=pq: one of none, fp16, sq8 for method=usearch"), done.stderr[-1000:]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("overrides, line", [
    (["method=flat", "quantisation=sq8"], "quantisation=sq8: none for method=flat, which keeps full-precision rows"),
    (["method=hnswlib", "refine_factor=4"], "refine_factor=4: 1 for method=hnswlib, which re-ranks nothing"),
])
def test_a_top_level_code_or_re_ranking_the_method_does_not_take_is_refused(overrides, line):
    from imgret.errors import ConfigError
    from imgret.validate import check_run_settings, invalid_point

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=synthetic_vectors", *overrides])
    with pytest.raises(ConfigError, match=f"^{line}"):
        check_run_settings(cfg)
    assert invalid_point(cfg).startswith(line)  # a sweep with skip_invalid=true skips it


def test_a_method_that_only_keeps_codes_takes_its_own_where_quantisation_is_none():
    assert compose_method("sq").quantisation == "sq8" and compose_method("binary").quantisation == "binary"
    assert compose_method("sq", "quantisation=fp16").quantisation == "fp16"
    assert compose_method("ivfpq").quantisation == "pq" and compose_method("usearch").quantisation == "none"


@pytest.mark.parametrize("name, codes", [("sq", "sq8"), ("hnsw_sq", "fp16"), ("ivfsq", "fp16"), ("binary", "binary")])
def test_faiss_s_codes_give_faiss_s_own_ids_and_re_ranking_recovers_the_exact_neighbours(name, codes, real_store):
    gallery, queries = real_store
    cfg = compose_method(name, f"quantisation={codes}", "ef_search=64", "nprobe=16")
    built = build_index(cfg, gallery)
    setting = METHODS[name].query_setting(cfg)
    ids = built.at(setting).search(queries, K)[1]
    assert np.array_equal(ids, built.native.search(queries, K)[1]), name  # the codes' own order, as faiss gives it
    refined = built.at({**setting, "refine_factor": 16}).search(queries, K)[1]
    assert recall(refined, gallery, queries) >= max(recall(ids, gallery, queries), 0.95), name
    bytes_per_row = {"sq8": 1, "fp16": 2, "binary": 1 / 8}[codes] * gallery.shape[1]
    assert built.nbytes < gallery.nbytes * (bytes_per_row / (4 * gallery.shape[1])) * 1.5 + (
        300_000 if name == "hnsw_sq" else 50_000), name  # the codes, and a graph's links or a coarse quantizer


@pytest.mark.parametrize("codes", ["fp16", "sq8"])
def test_usearch_s_dtypes_give_usearch_s_own_ids_in_fewer_bytes(codes, real_store):
    gallery, queries = real_store
    full = build_index(compose_method("usearch", "ef_search=64"), gallery)
    quantised = build_index(compose_method("usearch", f"quantisation={codes}", "ef_search=64"), gallery)
    native = quantised.native
    assert str(native.dtype) == f"ScalarKind.{METHODS['usearch'].quantisations[codes].upper()}"
    native.expansion_search = 64
    assert np.array_equal(quantised.index.search(queries, K)[1], native.search(queries, K).keys.astype(np.int64))
    assert quantised.nbytes < full.nbytes * (0.7 if codes == "fp16" else 0.5)
    assert recall(quantised.index.search(queries, K)[1], gallery, queries) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("codes", ["sq8", "pq"])
def test_qdrant_s_quantisation_gives_its_own_ids_with_and_without_its_rescoring(codes, real_store, tmp_path):
    """Qdrant's rescoring is its own (`reranks_itself`): imgret sends its request and re-ranks nothing again. (Its
    binary quantisation keeps raw signs: EfficientNet's features are never negative, so every row's code is the same
    and its order among them arbitrary: not compared here.)"""
    import qdrant_edge

    gallery, queries = real_store
    built = build_index(compose_method("qdrant", f"quantisation={codes}", "ef_search=128"), gallery, tmp_path / "c",
                        "real")
    try:
        found = {}
        for factor in (1, 4):
            setting = {"ef_search": 128, "refine_factor": factor}
            searcher = built.at(setting)
            assert not isinstance(searcher, Refined)
            ids = searcher.search(queries, K)[1]
            params = qdrant_edge.SearchParams(hnsw_ef=128, quantization=qdrant_edge.QuantizationSearchParams(
                rescore=factor > 1, oversampling=float(factor) if factor > 1 else None))
            bare = [[point.id for point in built.native.handle.query(qdrant_edge.QueryRequest(
                limit=K, query=qdrant_edge.Query.Nearest(query.tolist()), params=params))] for query in queries]
            assert np.array_equal(ids, np.asarray(bare)), (codes, factor)
            found[factor] = recall(ids, gallery, queries)
        assert found[4] >= max(found[1], 0.95), found
    finally:
        built.close()


@pytest.mark.slow
def test_the_quantisation_study_and_its_report(tmp_path, tiny_subset_zip):
    """The docs' quantisation study at the subset's size: FAISS's flat codes and Qdrant's, with and without re-ranking
    (FAISS's sq takes its own codes where quantisation is none: a point linked to its sq8 run); the report's table
    names codes and re-ranking."""
    command = documented("+experiment=quantisation model=efficientnet_lite0 data.archive=")
    work = docs_study(command, tmp_path, tiny_subset_zip, "method=sq,qdrant", "quantisation=none,sq8",
                      "refine_factor=1,4", "level=0")
    printed = run_command(documented("python -m imgret.report --experiment quantisation --all-runs"), work).stdout
    assert "Quantisation: index bytes against recall and speed" in printed
    text = printed
    for label, codes in (("FAISS SQ (flat scan of codes)", "sq8"), ("Qdrant HNSW (edge, client API)", "sq8"),
                         ("Qdrant HNSW (edge, client API)", "none")):
        assert f"| {label} | {codes} |" in text, (label, codes, text)
    assert "| 4 x k |" in text and "| no |" in text
