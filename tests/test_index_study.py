"""Issue 3's index types, the index cache, and both recall definitions."""
import faiss
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import PROJECT_ROOT, clustered_vectors
from imgret.errors import ConfigError
from imgret.index.build import build_index, index_cache_path
from imgret.index.methods import MethodSettings
from imgret.measure.metrics import queries_without_neighbours, recall_at, recall_at_ties, similarities_of

GALLERY = clustered_vectors(4000, 64, clusters=32, seed=2)
QUERIES = clustered_vectors(4200, 64, clusters=32, seed=2)[4000:]


def method(name, **params):
    return OmegaConf.create({"name": name, **params})


def exact(k=10):
    flat = faiss.IndexFlatIP(64)
    flat.add(GALLERY)
    return flat.search(QUERIES, k)


def test_hnsw_at_a_wide_search_finds_the_exact_neighbours():
    index = build_index(method("hnsw", hnsw_m=16, ef_construction=64, ef_search=1024), GALLERY).index
    assert recall_at(index.search(QUERIES, 10)[1], exact()[1], 10) >= 0.999
    narrow = build_index(method("hnsw", hnsw_m=4, ef_construction=8, ef_search=1), GALLERY).index
    assert recall_at(narrow.search(QUERIES, 10)[1], exact()[1], 10) < 0.999  # ef_search is really applied


def test_ivfpq_visiting_every_list_ranks_exactly_by_its_codes():
    """With nprobe = nlist nothing is pruned: what remains is the product quantiser's error, so the
    results are the exact neighbours of the vectors the codes decode to."""
    built = build_index(method("ivfpq", nlist=16, nprobe=16, pq_m=8, pq_nbits=8), GALLERY)
    ivfpq = built.index.index
    ivfpq.make_direct_map()
    decoded = ivfpq.reconstruct_n(0, ivfpq.ntotal)
    on_codes = faiss.IndexFlatIP(64)
    on_codes.add(decoded)
    codes_truth = on_codes.search(QUERIES, 10)[1]
    exhaustive = recall_at(built.index.search(QUERIES, 10)[1], codes_truth, 10)
    assert exhaustive >= 0.99
    fewer = build_index(method("ivfpq", nlist=16, nprobe=1, pq_m=8, pq_nbits=8), GALLERY).index
    assert recall_at(fewer.search(QUERIES, 10)[1], codes_truth, 10) < exhaustive  # nprobe is really applied


def test_factory_string_with_its_search_parameters():
    exhaustive = build_index(method("factory", index_factory="IVF16,Flat", search_params="nprobe=16"), GALLERY)
    assert recall_at(exhaustive.index.search(QUERIES, 10)[1], exact()[1], 10) == 1.0
    one = build_index(method("factory", index_factory="IVF16,Flat", search_params="nprobe=1"), GALLERY)
    assert faiss.extract_index_ivf(one.index.index).nprobe == 1
    with pytest.raises(ConfigError, match="^method.search_params=nosuchparam=3: 'name=value' pairs"):
        build_index(method("factory", index_factory="IVF16,Flat", search_params="nosuchparam=3"), GALLERY)


def test_ivfpq_sub_quantizers_must_divide_the_dimension():
    with pytest.raises(ConfigError, match="^method.pq_m=7: .* divides the embedding dimension \\(64\\): one of 1, 2, 4"):
        build_index(method("ivfpq", nlist=4, nprobe=1, pq_m=7, pq_nbits=8), GALLERY)


@pytest.mark.parametrize("first, second", [
    (method("ivf", nlist=16, nprobe=1), method("ivf", nlist=16, nprobe=8)),
    (method("hnsw", hnsw_m=8, ef_construction=20, ef_search=4), method("hnsw", hnsw_m=8, ef_construction=20, ef_search=64)),
    (method("ivfpq", nlist=8, nprobe=1, pq_m=8, pq_nbits=6), method("ivfpq", nlist=8, nprobe=8, pq_m=8, pq_nbits=6)),
])
def test_an_index_is_built_once_and_reused_with_new_query_settings(tmp_path, first, second):
    built = build_index(first, GALLERY, tmp_path, "gallery-a")
    assert not built.reused and built.path.is_file()
    again = build_index(second, GALLERY, tmp_path, "gallery-a")
    assert again.reused and again.path == built.path
    assert again.build_s == built.build_s  # reports the build it came from
    assert again.nbytes == built.nbytes == again.index.nbytes  # the saved file is the serialised index
    fresh = build_index(second, GALLERY)  # the same query setting on a newly built index
    assert np.array_equal(again.index.search(QUERIES, 10)[1], fresh.index.search(QUERIES, 10)[1])
    loaded = again.index.index
    if second.name == "hnsw":
        assert loaded.hnsw.efSearch == second.ef_search
    else:
        assert faiss.extract_index_ivf(loaded).nprobe == second.nprobe


def test_other_build_parameters_or_gallery_mean_another_index(tmp_path):
    a = index_cache_path(tmp_path, "gallery-a", MethodSettings.of(method("ivf", nlist=16, nprobe=1)))
    assert a != index_cache_path(tmp_path, "gallery-a", MethodSettings.of(method("ivf", nlist=32, nprobe=1)))
    assert a != index_cache_path(tmp_path, "gallery-b", MethodSettings.of(method("ivf", nlist=16, nprobe=1)))
    assert a == index_cache_path(tmp_path, "gallery-a", MethodSettings.of(method("ivf", nlist=16, nprobe=99)))


def test_an_index_file_without_its_meta_is_not_trusted(tmp_path):
    cfg = method("ivf", nlist=16, nprobe=4)
    built = build_index(cfg, GALLERY, tmp_path, "g")
    built.path.with_suffix(".json").unlink()  # as if killed between the two renames
    built.path.write_bytes(b"truncated")
    rebuilt = build_index(cfg, GALLERY, tmp_path, "g")
    assert not rebuilt.reused and rebuilt.path.with_suffix(".json").is_file()
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".damaged" and p.parent.name != ".damaged"], \
        "no temporary files left"
    assert [p.name.split(".faiss")[0] for p in (rebuilt.path.parent / ".damaged").iterdir()] == [rebuilt.path.stem]


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete meta"])
def test_a_damaged_index_is_moved_aside_and_rebuilt(tmp_path, damage):
    cfg = method("ivf", nlist=16, nprobe=16)
    built = build_index(cfg, GALLERY, tmp_path, "g")
    data = bytearray(built.path.read_bytes())
    if damage == "truncate":
        built.path.write_bytes(data[: len(data) // 2])
    elif damage == "alter":  # same size, a few bytes flipped deep in the inverted lists: faiss would read it
        data[-5000:-4990] = bytes(10)
        built.path.write_bytes(data)
    else:
        built.path.with_suffix(".json").unlink()
    rebuilt = build_index(cfg, GALLERY, tmp_path, "g")
    assert not rebuilt.reused, "a damaged index is never used"
    assert len(list((built.path.parent / ".damaged").iterdir())) >= 1
    assert build_index(cfg, GALLERY, tmp_path, "g").reused, "the rebuilt index is trusted again"
    assert recall_at(rebuilt.index.search(QUERIES, 10)[1], exact()[1], 10) == 1.0


def test_recall_by_ids_and_tie_aware_recall_on_hand_made_ties():
    # Query 0: gallery items 1 and 2 tie for 2nd place (0.9); the exact top-2 listed item 1.
    exact_scores = np.array([[1.0, 0.9], [0.8, 0.7]], dtype=np.float32)
    exact_ids = np.array([[0, 1], [5, 6]])
    found_ids = np.array([[0, 2], [5, 7]])
    found_sims = np.array([[1.0, 0.9], [0.8, 0.6]], dtype=np.float32)  # 7 is truly worse than 6
    assert recall_at(found_ids, exact_ids, 2) == pytest.approx(2 / 4)
    assert recall_at_ties(found_sims, exact_scores, 2) == pytest.approx(3 / 4)
    # within epsilon counts; beyond it does not; a missing result (-inf) never counts
    assert recall_at_ties(np.array([[1.0, 0.9 - 5e-7]]), np.array([[1.0, 0.9]]), 2, epsilon=1e-6) == 1.0
    assert recall_at_ties(np.array([[1.0, 0.9 - 5e-6]]), np.array([[1.0, 0.9]]), 2, epsilon=1e-6) == 0.5
    assert recall_at_ties(np.array([[1.0, -np.inf]]), np.array([[1.0, 0.9]]), 2) == 0.5


def test_recall_never_counts_no_result_as_a_hit_where_a_filter_allows_fewer_rows_than_k():
    """The exact truth is padded with -1 / -inf past the rows a query's filter allows; a method's own -1 padding must
    not match it. Recall is |found ∩ exact| over the exact neighbours that exist, a query with none is left out."""
    exact_ids = np.array([[4, 9, -1, -1], [7, -1, -1, -1], [-1, -1, -1, -1], [1, 2, 3, 5]])
    exact_sims = np.where(exact_ids >= 0, np.array([[0.9, 0.8, 0.7, 0.6]] * 4), -np.inf).astype(np.float32)
    nothing = np.full((4, 4), -1)  # a method that found no row at all
    assert recall_at(nothing, exact_ids, 4) == 0.0  # counting each -1 slot as a hit gave 12 / 16
    assert recall_at_ties(np.full((4, 4), -np.inf), exact_sims, 4) == 0.0
    found_ids = np.array([[9, -1, -1, -1], [7, -1, -1, -1], [-1, -1, -1, -1], [1, 2, 8, 8]])
    # per query: 1 of 2, 1 of 1, (no neighbour: left out), 2 of 4
    assert recall_at(found_ids, exact_ids, 4) == pytest.approx((1 / 2 + 1 + 2 / 4) / 3)
    found_sims = np.where(found_ids >= 0, np.array([[0.8, 0, 0, 0], [0.9, 0, 0, 0], [0, 0, 0, 0],
                                                    [0.9, 0.8, 0.1, 0.1]]), -np.inf).astype(np.float32)
    assert recall_at_ties(found_sims, exact_sims, 4) == pytest.approx((1 / 2 + 1 + 2 / 4) / 3)
    assert queries_without_neighbours(exact_ids) == 1
    # a neighbour returned twice counts once; at depth 1 only the first exact neighbour counts
    assert recall_at(np.array([[4, 4, 4, 4]]), exact_ids[:1], 4) == 0.5
    assert recall_at(found_ids, exact_ids, 1) == pytest.approx((0 + 1 + 1) / 3)
    # no query with a neighbour at all: no figure rather than a perfect one
    assert np.isnan(recall_at(nothing[:1], exact_ids[2:3], 4)) and np.isnan(
        recall_at_ties(np.full((1, 4), -np.inf), exact_sims[2:3], 4))
    # ties among the allowed rows: the last exact neighbour's similarity is the threshold, not the k-th's (-inf)
    assert recall_at_ties(np.array([[0.8, 0.8, 0.8, -np.inf]]), exact_sims[:1], 4) == 1.0  # capped at the 2 that exist
    assert recall_at_ties(np.array([[0.8, 0.79, -np.inf, -np.inf]]), exact_sims[:1], 4, epsilon=1e-6) == 0.5


def test_similarities_of_found_ids_are_the_true_inner_products():
    ids = np.array([[3, -1], [0, 7]])
    sims = similarities_of(ids, GALLERY, QUERIES[:2])
    assert sims[0, 0] == pytest.approx(float(GALLERY[3] @ QUERIES[0]), abs=1e-6)
    assert sims[1, 1] == pytest.approx(float(GALLERY[7] @ QUERIES[1]), abs=1e-6)
    assert sims[0, 1] == -np.inf


def test_hnsw_is_searched_at_the_ef_search_it_is_labelled_with_every_zoo_effort_a_search_of_its_own():
    """FAISS (1.15) sizes HNSW's candidate heap max(efSearch, k) but stops its walk by efSearch itself, so even
    below k each ef_search is a search of its own. For every effort index_zoo sweeps (at its k=10), the search
    imgret times under the label ef_search=E makes exactly the distance computations, and finds exactly the ids, of
    bare faiss at efSearch=E; and the count grows with E, so no two labels are one search. A faiss that floored ef at
    k would give equal counts at 1 and 10 here, and imgret would then have to refuse ef_search < k."""
    zoo = OmegaConf.load(PROJECT_ROOT / "experiments" / "index_zoo.yaml")
    efforts = [int(e) for e in str(zoo.hydra.sweeper.params.effort).split(",")]
    k = OmegaConf.load(PROJECT_ROOT / "conf" / "config.yaml").k
    built = build_index(method("hnsw", hnsw_m=16, ef_construction=40, ef_search=efforts[0]), GALLERY)
    bare = faiss.IndexHNSWFlat(64, 16, faiss.METRIC_INNER_PRODUCT)
    bare.hnsw.efConstruction = 40
    bare.add(GALLERY)

    def distance_computations(search):
        faiss.cvar.hnsw_stats.reset()
        ids = search()
        return faiss.cvar.hnsw_stats.ndis, ids

    counts = []
    for effort in efforts:
        at_effort = built.at({"ef_search": effort})
        labelled, ids = distance_computations(lambda: at_effort.search(QUERIES, k)[1])
        searched, bare_ids = distance_computations(
            lambda: bare.search(QUERIES, k, params=faiss.SearchParametersHNSW(efSearch=effort))[1])
        assert labelled == searched and np.array_equal(ids, bare_ids), effort
        counts.append(labelled)
    assert counts == sorted(set(counts)), f"efforts {efforts} gave distance counts {counts}"


def test_each_method_names_its_own_settings(tmp_path):
    """Run names, the demo's labels and cache file names come from the method, which alone knows how its settings
    read (a factory string names itself, commas and all)."""
    from imgret.index.build import index_cache_path
    from imgret.index.methods import METHODS
    from imgret.options import Options
    from imgret.track.runs import run_name

    ivf = Options(name="ivf", nlist=256, nprobe=8, train_size=None, on_disk=False)
    factory = Options(name="factory", index_factory="IVF16,PQ8", train_size=None, on_disk=False,
                      search_params="nprobe=4")
    assert run_name(ivf, "resnet18") == "resnet18-ivf-nlist256-nprobe8"
    assert run_name(factory, "resnet18") == "resnet18-factory-IVF16,PQ8-nprobe=4"
    assert METHODS["ivf"].choice_label({"nlist": 256, "nprobe": 8}) == "ivf nlist=256 nprobe=8"
    assert METHODS["factory"].choice_label(dict(factory)) == "factory IVF16,PQ8"
    assert index_cache_path(tmp_path, "g", MethodSettings.of(ivf)).name.startswith("ivf-nlist256-")
    assert "," not in index_cache_path(tmp_path, "g", MethodSettings.of(factory)).name
