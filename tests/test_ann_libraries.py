"""Every search method on a small real store (real Tiny-ImageNet images of 20 classes, embedded by the trained
EfficientNet-Lite0 at 112 px): imgret's ids equal the library's own calls on the same index; at the method's most
exhaustive level, tie-aware recall@10 >= 0.99; saved and loaded, the same ids; a missing library refused in one line.

Each library's bare calls are written here with its own API, not imgret's: a method that converted, reordered or
searched at another setting than it is labelled with would differ from them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF_DIR, PROJECT_ROOT
from imgret.index.base import search_threads_now
from imgret.index.libraries.faiss_indexes import FaissMethod
from imgret.index.build import build_index
from imgret.index.methods import METHODS, is_database
from imgret.measure.metrics import recall_at_ties

K = 10


def _hnswlib(index, queries, setting, threads):
    index.set_ef(setting["ef_search"])
    return index.knn_query(queries, K, num_threads=threads)[0]


def _voyager(index, queries, setting, threads):
    return index.query(queries, K, num_threads=threads, query_ef=setting["ef_search"])[0]


def _usearch(index, queries, setting, threads):
    index.expansion_search = setting["ef_search"]
    return index.search(queries, K, threads=threads).keys


def _usearch_exact(gallery, queries, setting, threads):
    from usearch.index import search

    return search(gallery, queries, K, "ip", exact=True, threads=threads).keys


def _annoy(index, queries, setting, threads):
    return [index.get_nns_by_vector(q, K, search_k=setting["search_k"]) for q in queries]


def _nmslib(index, queries, setting, threads):
    index.setQueryTimeParams({"efSearch": setting["ef_search"]})
    return [ids for ids, _ in index.knnQueryBatch(queries, K, num_threads=threads)]


def _pynndescent(index, queries, setting, threads):
    return index.query(queries, K, epsilon=setting["epsilon"])[0]


def _ngt(folder_index, queries, setting, threads):
    return [[row for row, _ in folder_index.index.search(q, size=K, epsilon=setting["epsilon"],
                                                        edge_size=setting["edge_size"])] for q in queries]


def _diskann(folder_index, queries, setting, threads):
    return folder_index.index.batch_search(queries, k_neighbors=K, complexity=setting["complexity"],
                                           num_threads=threads).identifiers


def _diskann_disk(folder_index, queries, setting, threads):
    return folder_index.index.batch_search(queries, k_neighbors=K, complexity=setting["complexity"],
                                           num_threads=threads, beam_width=setting["beam_width"]).identifiers


def _scann(folder_index, queries, setting, threads):
    leaves = min(setting["leaves_to_search"], int(folder_index.graph))  # the tree's leaves, at most
    found = [folder_index.index.search(query, final_num_neighbors=K, leaves_to_search=leaves,
                                       pre_reorder_num_neighbors=setting["reorder"])[0] for query in queries]
    return [[*row, *[-1] * (K - len(row))] for row in found]  # leaves holding fewer than K rows: -1 for the rest


def _scann_exact(searcher, queries, setting, threads):
    return [searcher.search(query, final_num_neighbors=K)[0] for query in queries]


def _faiss(index, queries, setting, threads):
    import faiss

    index = faiss.clone_index(index)  # the labelled setting applied to a copy, the bare way
    if "nprobe" in setting:
        faiss.extract_index_ivf(index).nprobe = setting["nprobe"]
    if "ef_search" in setting:
        index.hnsw.efSearch = setting["ef_search"]
    return index.search(queries, K)[1]


def _factory(index, queries, setting, threads):
    import faiss

    index = faiss.clone_index(index)  # the string's query parameters set on a copy, as faiss's own docs set them
    faiss.ParameterSpace().set_index_parameters(index, setting["search_params"])
    return index.search(queries, K)[1]


def _brute(exact, queries, setting, threads):  # brute force's index: the gallery's rows (`ExactGallery`)
    return np.argsort(-(queries @ exact.rows.T), axis=1, kind="stable")[:, :K]


BARE = {"hnswlib": _hnswlib, "voyager": _voyager, "usearch": _usearch, "usearch_exact": _usearch_exact,
        "annoy": _annoy, "nmslib": _nmslib, "pynndescent": _pynndescent, "ngt": _ngt, "diskann": _diskann,
        "diskann_disk": _diskann_disk, "scann": _scann, "scann_exact": _scann_exact, "factory": _factory,
        "brute": _brute}
LIBRARIES = [name for name in METHODS if not is_database(name)]


def bare_calls(name: str):
    """The library's own calls for a method: its own function above, or, for an index of FAISS's, FAISS's calls
    (a copy of the index, its nprobe or efSearch set, `search`), which search any FAISS index alike."""
    return BARE.get(name) or (_faiss if isinstance(METHODS[name], FaissMethod) else None)
# A method's settings for this test beyond its yaml's: the factory string here is one whose every list is visited.
OVERRIDES = {"factory": ("method.index_factory='IVF16,Flat'", "method.search_params='nprobe=16'")}
def compose_method(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"method={name}", "nlist=16", *overrides])


def _ids(found) -> np.ndarray:
    return np.asarray([np.asarray(row, dtype=np.int64) for row in found])


def test_every_library_method_registered_has_its_library_s_own_calls_here():
    assert set(BARE) <= set(LIBRARIES), set(BARE) - set(LIBRARIES)
    assert all(bare_calls(name) for name in LIBRARIES), "a registered method without its library's own calls"


@pytest.mark.slow
@pytest.mark.parametrize("name", LIBRARIES)
def test_a_method_gives_its_library_s_own_ids_reaches_0_99_at_its_top_level_and_reloads(name, real_store, tmp_path,
                                                                                       monkeypatch):
    gallery, queries = real_store
    monkeypatch.chdir(tmp_path)  # the cache as a run's default is, relative to the working folder
    top = len(compose_method(name).method.get("levels") or [None]) - 1
    extra = OVERRIDES.get(name, ())
    cheap = compose_method(name, "level=0" if top else "level=null", *extra)
    exhaustive = compose_method(name, f"level={top}" if top else "level=null", *extra)
    threads = search_threads_now()
    torch.set_num_threads(1)  # a graph built on several threads inserts in a varying order, and so varies its recall
    try:
        built = build_index(exhaustive.method, gallery, Path("cache"), "real")
    finally:
        torch.set_num_threads(threads)
    for cfg in (cheap, exhaustive):
        searcher = built.at(METHODS[name].query_setting(cfg.method))
        ids = searcher.search(queries, K)[1]
        bare = _ids(bare_calls(name)(built.native, queries, dict(METHODS[name].query_setting(cfg.method)), threads))
        assert np.array_equal(ids, bare), f"{name} at {METHODS[name].query_setting(cfg.method)}"
        one_at_a_time = np.concatenate([searcher.search(queries[i:i + 1], K)[1] for i in range(len(queries))])
        assert np.array_equal(one_at_a_time, ids), f"{name}: one query per call gave other rows"

    exact_scores = np.sort(queries @ gallery.T, axis=1)[:, ::-1][:, :K]
    scores, found = built.index.search(queries, K)
    found_scores = np.where(found >= 0, np.take_along_axis(queries @ gallery.T, np.maximum(found, 0), 1), -np.inf)
    if METHODS[name].scores_on is None:  # imgret's scores are the cosines of the rows it returns
        assert scores.dtype == np.float32 and found.dtype == np.int64
        assert np.allclose(scores, found_scores, atol=1e-4) and np.array_equal(scores == -np.inf, found < 0), name
    recall = recall_at_ties(found_scores, exact_scores, K, 1e-6)
    if METHODS[name].recall_bound:  # its codes, not a setting, bound its recall
        assert recall > 0.5, (name, recall)
    else:
        assert recall >= 0.99, f"{name} at {METHODS[name].query_setting(exhaustive.method)}: recall@10 {recall}"

    if METHODS[name].cached:
        again = build_index(exhaustive.method, gallery, Path("cache"), "real")
        assert again.reused and np.array_equal(again.index.search(queries, K)[1], found), name
        assert again.nbytes == built.nbytes > 0
    else:  # what a run logs as the index's size: an index never cached is measured as it would be saved
        assert built.nbytes > 0


# The real entry point, with the library's module made unimportable (as if it were not installed).
MISSING_LIBRARY = ("import runpy, sys; sys.modules[{module!r}] = None; "
                   "sys.argv = ['imgret.run', 'method={name}', 'model.pretrained=false', 'tracking.uri=sqlite:///{db}', "
                   "'paths.cache={cache}']; "
                   "runpy.run_module('imgret.run', run_name='__main__')")


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.module])
def test_a_method_whose_library_is_missing_is_refused_naming_what_to_install(name, monkeypatch):
    from imgret.errors import ConfigError
    from imgret.index.methods import validate_search

    method = METHODS[name]
    monkeypatch.setitem(sys.modules, method.module, None)  # as if it were not installed
    with pytest.raises(ConfigError) as refused:
        validate_search(compose_method(name).method, K)
    assert str(refused.value).startswith(f"method={name} needs the Python module {method.module}")
    assert f"pip install {method.install}" in str(refused.value) and "\n" not in str(refused.value)


def test_the_run_refuses_a_missing_library_in_one_line_before_any_work(tmp_path):
    script = MISSING_LIBRARY.format(module="hnswlib", name="hnswlib", db=tmp_path / "mlflow.db", cache=tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0] == ("config error: method=hnswlib needs the Python module hnswlib (import of hnswlib halted; None in "
                        "sys.modules): install it with `pip install hnswlib==0.8.0`, or `pip install 'imgret[ann]'` for "
                        "every ANN library")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()  # before any work


def test_each_method_module_registers_its_methods_and_every_method_has_a_config():
    configs = {path.stem for path in (PROJECT_ROOT / "conf" / "method").glob("*.yaml")}
    assert configs == set(METHODS), configs ^ set(METHODS)
    for name, method in METHODS.items():
        assert method.label and method.ordering, name
        cfg = compose_method(name).method
        assert cfg.name == name
        assert set(method.build_params + method.query_params) <= set(cfg), (name, set(cfg))


def test_a_long_build_that_reports_nothing_shows_its_seconds_and_one_with_its_own_progress_is_left_alone(capsys):
    from imgret.index.base import ADD_CHUNK_ROWS

    rows = np.random.default_rng(0).standard_normal((ADD_CHUNK_ROWS + 1, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    build_index(OmegaConf.create({"name": "annoy", "n_trees": 2, "search_k": 10}), rows)
    assert f"building Annoy over {ADD_CHUNK_ROWS + 1:,} vectors: 00:" in capsys.readouterr().err
    build_index(OmegaConf.create({"name": "ivf", "nlist": 4, "nprobe": 1}), rows)
    assert "building FAISS IVF" not in capsys.readouterr().err  # faiss's training and adds have their own bars
    build_index(OmegaConf.create({"name": "annoy", "n_trees": 2, "search_k": 10}), rows[:1000])
    assert "building Annoy" not in capsys.readouterr().err  # a small gallery: done before a bar would say anything


@pytest.mark.slow  # a real run in its own process (bounded: diskannpy 0.7.0 opened with one thread never returned)
def test_a_single_thread_run_of_the_diskann_ssd_index_finishes(tmp_path):
    run = subprocess.run([sys.executable, "-m", "imgret.run", "method=diskann_disk", "data=synthetic_vectors",
                          "data.gallery_size=3000", "data.query_size=50", "data.dim=16", "data.intrinsic_dim=8", "threads=1",
                          "search.threads=1", f"paths.cache={tmp_path / 'cache'}",
                          f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'out'}"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "recall@1 / @10" in run.stdout + run.stderr


def test_results_of_varying_length_are_padded_and_turned_into_scores_alike_on_both_paths():
    from imgret.index.base import top_k_arrays

    distances = [np.array([0.1, 0.3, 0.5], np.float32), np.array([0.2, 0.4, 0.6], np.float32)]
    scores, ids = top_k_arrays([[4, 5, 6], [7, 8, 9]], distances, 3, lambda d: 1 - d)  # every query found k
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    assert np.array_equal(ids, [[4, 5, 6], [7, 8, 9]]) and np.allclose(scores, [[0.9, 0.7, 0.5], [0.8, 0.6, 0.4]])
    scores, ids = top_k_arrays([[4, 5, 6], [7]], [distances[0], distances[1][:1]], 3, np.negative)  # one found less
    assert np.array_equal(ids, [[4, 5, 6], [7, -1, -1]])
    assert np.allclose(scores[0], [-0.1, -0.3, -0.5]) and scores[1, 0] == np.float32(-0.2)
    assert np.all(scores[1, 1:] == -np.inf)  # padding stays -inf: not turned into a score


def test_query_rows_are_passed_as_they_are_when_a_binding_takes_them_and_copied_when_not(tmp_path):
    from imgret.index.base import plain_rows

    rows = np.ones((3, 4), np.float32)
    assert plain_rows(rows) is rows and plain_rows(rows[1:2]).base is rows
    np.save(tmp_path / "rows.npy", rows)
    mapped = np.load(tmp_path / "rows.npy", mmap_mode="r")
    for other in (mapped, mapped[:2], rows[:, :2], rows.astype(np.float64), rows.T):
        plain = plain_rows(other)
        assert type(plain) is np.ndarray and plain.dtype == np.float32 and plain.flags.c_contiguous
        assert plain.flags.writeable and np.array_equal(plain, other)


def test_a_working_folder_left_by_a_killed_process_is_removed_by_the_next_one_made_there(tmp_path):
    import socket
    import zlib
    from pathlib import Path

    from imgret.index.folders import new_folder

    near = tmp_path / "index.bin"
    made = ("import os, sys; from pathlib import Path; from imgret.index.folders import new_folder; "
            "folder = new_folder(Path(sys.argv[1])); print(folder.name, flush=True); os.kill(os.getpid(), 9)")
    killed = subprocess.run([sys.executable, "-c", made, str(near)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    abandoned = Path(killed.stdout.strip())
    assert abandoned.is_dir() and abandoned.parent == tmp_path
    other_host = tmp_path / f".index.work.{zlib.crc32(('not-' + socket.gethostname()).encode()):08x}-1.x"
    other_host.mkdir()
    live = new_folder(near)
    assert not abandoned.exists(), "the killed process's folder is removed"
    assert other_host.is_dir(), "another host's folder is left alone (its process cannot be checked from here)"
    again = new_folder(near)
    assert Path(live.name).is_dir() and Path(again.name).is_dir(), "this process's folders are its own to remove"
    live.cleanup(), again.cleanup()


THROWAWAY_MODULE = '''"""A method written for a test: an exact scan in numpy, a block of queries per product."""
import numpy as np

from imgret.index.base import Method
from imgret.index.params import QUERY, Param


class Throwaway(Method):
    name, label = "throwaway", "Throwaway scan"
    exact, cached = True, False
    params = (Param("query_block", QUERY),)

    def build(self, opts, gallery, threads, path=None):
        return np.asarray(gallery, dtype=np.float32)

    def save(self, native, path):
        np.save(path, native)

    def bare(self, native, queries, k, setting, threads):
        block = int(setting["query_block"])
        similarities = np.concatenate([queries[i:i + block] @ native.T for i in range(0, len(queries), block)])
        ids = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(similarities, ids, axis=1), ids

    def results(self, found, k):
        return found


METHODS = (Throwaway(),)
'''
THROWAWAY_YAML = "# An exact scan in numpy, for a test.\nname: throwaway\nquery_block: 16  # queries per product\n"
# The entry points as a user runs them, with the throwaway's module on the methods' package path and its yaml on
# Hydra's search path: nothing of imgret is edited.
WITH_THROWAWAY = ("import runpy, sys; import imgret.index.libraries as methods; methods.__path__.append({modules!r}); "
                  "sys.argv = [{entry!r}, *sys.argv[1:]]; runpy.run_module({entry!r}, run_name='__main__')")


@pytest.mark.slow  # two runs and a report, each in its own process
def test_a_method_added_as_a_module_and_a_yaml_alone_is_registered_checked_run_and_labelled(tmp_path):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "throwaway_index.py").write_text(THROWAWAY_MODULE)
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "throwaway.yaml").write_text(THROWAWAY_YAML)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def imgret(entry: str, *args: str) -> subprocess.CompletedProcess:
        script = WITH_THROWAWAY.format(modules=str(tmp_path / "modules"), entry=entry)
        return subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)

    common = ("method=throwaway", "data=synthetic_vectors", "data.gallery_size=2000", "data.query_size=40",
              "data.dim=16", "data.intrinsic_dim=8", f"paths.cache={tmp_path / 'cache'}", f"tracking.uri={uri}",
              f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.run.dir={tmp_path / 'out'}")
    refused = imgret("imgret.run", *common, "method.query_block=0")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "config error: method.query_block=0: a whole number >= 1"], refused.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists(), "refused before any run"

    done = imgret("imgret.run", *common, "k=10")
    assert done.returncode == 0, done.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["imgret"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "throwaway"
    assert run.data.params["method.query_block"] == "16" and run.data.metrics["recall_at_10_ties"] == 1.0

    report = imgret("imgret.report", "--tracking-uri", uri, "--all-runs", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Throwaway scan" in (tmp_path / "report" / "seed_table.md").read_text()
