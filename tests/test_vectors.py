"""Galleries of vectors: generated clustered vectors written in chunks into stores, and indexes trained on a
sample and filled in chunks."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import clustered_vectors
from imgret.errors import ConfigError
from imgret.index import build_index, training_sample
from imgret.metrics import recall_at
from imgret.run import run_tracked
from imgret.vectors import ensure_vector_stores, synthetic_chunk
from test_faults import all_runs

VECTORS = ("data=synthetic_vectors", "data.gallery_size=3000", "data.query_size=50", "data.dim=32",
           "data.clusters=20")


def test_generated_vectors_run_end_to_end_without_a_model(make_cfg):
    cfg = make_cfg(*VECTORS, "method=ivf", "nlist=16", "nprobe=16", "k=5")
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
    embeddings = ensure_vector_stores(cfg)
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
    assert not np.array_equal(np.asarray(ensure_vector_stores(other).gallery.vectors), gallery)


@pytest.mark.parametrize("override, key", [("data.gallery_size=0", "data.gallery_size=0"),
                                           ("data.spread=-1", "data.spread=-1"),
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
