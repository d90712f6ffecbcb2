"""Galleries of vectors: generated clustered vectors written in chunks into stores, and indexes trained on a
sample and filled in chunks."""
from __future__ import annotations

import numpy as np
from pathlib import Path
import pytest
from omegaconf import OmegaConf

from conftest import clustered_vectors
from imgret.errors import ConfigError
from imgret.index.build import build_index
from imgret.index.faiss_build import training_sample
from imgret.index.brute import BruteForceIndex
from imgret.measure.metrics import recall_at
from imgret.run import run_tracked
from imgret.embed.vector_stores import ensure_vector_stores
from imgret.sources.vectors import synthetic_chunk
from test_faults import all_runs

VECTORS = ("data=synthetic_vectors", "data.gallery_size=3000", "data.query_size=50", "data.dim=32",
           "data.clusters=20")


def test_generated_vectors_run_end_to_end_without_a_model(make_cfg):
    cfg = make_cfg(*VECTORS, "method=ivf", "nlist=16", "nprobe=16", "k=10")
    metrics = run_tracked(cfg)
    assert metrics["recall_at_10"] == 1.0 and metrics["gallery_size"] == 3000 and metrics["dim"] == 32
    assert np.isnan(metrics["extract_ms_per_image"]) and np.isnan(metrics["extract_images_per_s"])
    run = all_runs(cfg.tracking.uri)[0]
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "vectors"
    assert run.info.run_name.startswith("vectors-ivf-nlist16")
    assert run.data.tags["embeddings_extracted"] == "gallery,queries"
    again = run_tracked(cfg)
    assert all_runs(cfg.tracking.uri)[1].data.tags["embeddings_extracted"] == "none"
    assert again["recall_at_10"] == metrics["recall_at_10"]


def test_generated_stores_are_unit_vectors_labelled_by_cluster_and_deterministic(make_cfg, tmp_path):
    cfg = make_cfg(*VECTORS)
    embeddings = ensure_vector_stores(cfg.data, cfg.seed, Path(cfg.paths.cache))
    gallery = np.asarray(embeddings.gallery.vectors)
    assert gallery.shape == (3000, 32) and np.allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    labels = embeddings.gallery.labels
    assert set(np.unique(labels)) <= set(range(20)) and len(np.unique(labels)) == 20
    centroid_of = {c: gallery[labels == c].mean(axis=0) for c in range(20)}
    nearest = np.argmax(np.stack([gallery @ centroid_of[c] for c in range(20)], axis=1), axis=1)
    assert (nearest == labels).mean() > 0.9, "a vector's label is the cluster it was drawn around"
    rows, chunk_labels = synthetic_chunk(cfg.data, cfg.seed, "gallery", 0, 3000)
    assert np.array_equal(rows, gallery) and np.array_equal(chunk_labels, labels)
    other = make_cfg(*VECTORS, "seed=1")
    assert not np.array_equal(np.asarray(ensure_vector_stores(other.data, other.seed, Path(other.paths.cache)).gallery.vectors), gallery)


@pytest.mark.parametrize("override, key", [("data.gallery_size=0", "data.gallery_size=0"),
                                           ("data.spread=-1", "data.spread=-1"),
                                           ("data.intrinsic_dim=64", "data.intrinsic_dim=64"),
                                           ("data.noise=-0.1", "data.noise=-0.1"),
                                           ("nlist=4000", "nlist=4000"),
                                           ("method.pq_m=7", "method.pq_m=7")])
def test_bad_vector_settings_are_refused_before_any_work(make_cfg, tmp_path, override, key):
    method = ["method=ivfpq", "nlist=16", "nprobe=4"]
    with pytest.raises(ConfigError) as error:
        run_tracked(make_cfg(*VECTORS, *method, override))
    assert str(error.value).startswith(key)
    if key == "method.pq_m=7":
        assert "(32)" in str(error.value), "checked against the vectors' own dimension"
    assert not (tmp_path / "cache").exists()


def test_the_training_sample_is_deterministic_and_sized_by_the_lists():
    vectors = clustered_vectors(5000, 16, clusters=8, seed=2)
    method = OmegaConf.create({"name": "ivf", "nlist": 8, "nprobe": 8, "train_size": 1000})
    first, second = training_sample(vectors, method), training_sample(vectors, method)
    assert first.shape == (1000, 16) and np.array_equal(first, second)
    assert {tuple(row) for row in first[:50]} <= {tuple(row) for row in vectors}, "rows of the gallery"
    assert len(training_sample(vectors, OmegaConf.create({"name": "ivf", "nlist": 8, "train_size": None}))) == 5000
    built = build_index(method, vectors)  # trained on 1,000, every vector added
    assert built.index.index.ntotal == 5000
    exact = np.argsort(-(vectors[:40] @ vectors.T), axis=1)[:, :10]
    assert recall_at(built.index.search(vectors[:40], 10)[1], exact, 10) == 1.0


def test_approximate_indexes_miss_some_neighbours_of_the_default_synthetic_vectors(make_cfg):
    """The default clusters are not trivially separable: IVF at one probe misses neighbours, all probes none."""
    one = run_tracked(make_cfg("data=synthetic_vectors", "data.gallery_size=20000", "data.query_size=200",
                               "data.dim=64", "method=ivf", "nlist=128", "nprobe=1"))
    every = run_tracked(make_cfg("data=synthetic_vectors", "data.gallery_size=20000", "data.query_size=200",
                                 "data.dim=64", "method=ivf", "nlist=128", "nprobe=128"))
    assert 0.2 < one["recall_at_10"] < 0.95 and every["recall_at_10"] == 1.0
    assert one["precision_at_10"] > 0.9, "near neighbours share the cluster"


def test_brute_force_streams_a_gallery_larger_than_its_resident_limit(tmp_path):
    vectors = clustered_vectors(5000, 16, clusters=8, seed=4)
    np.save(tmp_path / "g.npy", vectors)
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    streamed = BruteForceIndex(mapped, query_chunk=7, resident_bytes=0, block_rows=999)
    resident = BruteForceIndex(mapped, query_chunk=7)
    assert streamed.streamed and not resident.streamed and streamed.gallery is mapped, "no copy of the gallery"
    for queries in (vectors[:1] + 0.01, vectors[100:160] + 0.01):
        scores, ids = streamed.search(queries, 10)
        exact_scores, exact_ids = resident.search(queries, 10)
        assert np.array_equal(ids, exact_ids) and np.allclose(scores, exact_scores, atol=1e-6)


def test_on_disk_inverted_lists_give_the_in_memory_results_and_survive_a_move(tmp_path, monkeypatch):
    import imgret.index.faiss_build as faiss_build

    monkeypatch.setattr(faiss_build, "ADD_CHUNK_ROWS", 1500)  # several chunks, each touching most lists
    vectors = clustered_vectors(5000, 16, clusters=8, seed=5)
    np.save(tmp_path / "g.npy", vectors)
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    settings = {"name": "ivf", "nlist": 16, "nprobe": 4, "train_size": None}
    in_memory = build_index(OmegaConf.create({**settings, "on_disk": False}), mapped, tmp_path / "cache", "g")
    on_disk = build_index(OmegaConf.create({**settings, "on_disk": True}), mapped, tmp_path / "cache", "g")
    queries = vectors[:50] + 0.01
    assert np.array_equal(in_memory.index.search(queries, 10)[1], on_disk.index.search(queries, 10)[1])
    lists = on_disk.path.with_suffix(".ivfdata")
    assert lists.stat().st_size > 5000 * 16 * 4 and on_disk.path.stat().st_size < lists.stat().st_size / 4
    assert on_disk.nbytes == on_disk.path.stat().st_size + lists.stat().st_size
    assert lists.stat().st_size == 5000 * (16 * 4 + 8), "each list's slot is its size: codes and ids, once"
    pq = {"name": "ivfpq", "nlist": 16, "nprobe": 4, "pq_m": 4, "pq_nbits": 8, "train_size": None, "refine_factor": 1}
    pq_in_memory = build_index(OmegaConf.create({**pq, "on_disk": False}), mapped, tmp_path / "cache", "g")
    pq_on_disk = build_index(OmegaConf.create({**pq, "on_disk": True}), mapped, tmp_path / "cache", "g")
    assert np.array_equal(pq_in_memory.index.search(queries, 10)[1], pq_on_disk.index.search(queries, 10)[1])

    (tmp_path / "cache").rename(tmp_path / "moved")  # the lists are found beside the index, not at the old path
    again = build_index(OmegaConf.create({**settings, "on_disk": True}), mapped, tmp_path / "moved", "g")
    assert again.reused and np.array_equal(again.index.search(queries, 10)[1], in_memory.index.search(queries, 10)[1])

    moved_lists = again.path.with_suffix(".ivfdata")
    with open(moved_lists, "r+b") as handle:  # damage the lists: checked, moved aside, built again
        handle.seek(100)
        handle.write(b"\xff" * 8)
    rebuilt = build_index(OmegaConf.create({**settings, "on_disk": True}), mapped, tmp_path / "moved", "g")
    assert not rebuilt.reused and (tmp_path / "moved" / "indexes" / "g" / ".damaged").is_dir()


def test_generated_noise_drawn_in_blocks_is_the_one_draw_of_before(monkeypatch, make_cfg):
    """Stores generated before the noise was drawn in blocks hold the same rows: their cache keys stay valid."""
    import imgret.sources.vectors as vectors

    cfg = make_cfg(*VECTORS)
    blocked = synthetic_chunk(cfg.data, cfg.seed, "gallery", 0, 3000)
    monkeypatch.setattr(vectors, "NOISE_BLOCK_ROWS", 1000)
    assert np.array_equal(synthetic_chunk(cfg.data, cfg.seed, "gallery", 0, 3000)[0], blocked[0])
    monkeypatch.setattr(vectors, "NOISE_BLOCK_ROWS", 10 ** 9)  # one draw, as before
    assert np.array_equal(synthetic_chunk(cfg.data, cfg.seed, "gallery", 0, 3000)[0], blocked[0])


def _mapped_file_bytes() -> int:
    """This process's resident pages that map files (RssFile in /proc/self/status)."""
    line = next(line for line in open("/proc/self/status") if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


def test_building_over_a_mapped_gallery_leaves_its_pages_unmapped(tmp_path):
    """The chunks faiss reads are the map's own pages; each is released after faiss used it, so neither a chunked add
    nor on-disk lists keep the gallery in the resident set (releasing before the use would fault it all back)."""
    np.save(tmp_path / "g.npy", clustered_vectors(200_000, 128, clusters=20, seed=6))  # 102 MB
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    for on_disk in (False, True):
        before = _mapped_file_bytes()
        build_index(OmegaConf.create({"name": "ivf", "nlist": 64, "nprobe": 4, "train_size": 20_000,
                                      "on_disk": on_disk}), mapped, tmp_path / "cache", "g")
        assert _mapped_file_bytes() - before < mapped.nbytes / 4, f"on_disk={on_disk}"
