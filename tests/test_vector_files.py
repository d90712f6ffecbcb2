"""data=vectors: embeddings researchers bring, in every format imgret reads, stored L2-normalised and searched
like extracted ones; and their bad inputs, refused before any work."""
from __future__ import annotations

import h5py
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgret.errors import ConfigError
from imgret.run import run_tracked
from imgret.sources.vector_files import VectorFileError, open_vectors
from imgret.embed.vector_stores import ensure_vector_stores
from test_faults import all_runs

RNG = np.random.default_rng(3)
GALLERY = RNG.normal(size=(600, 24)).astype(np.float32)
QUERIES = RNG.normal(size=(30, 24)).astype(np.float32)
BYTES = RNG.integers(0, 256, size=(600, 24)).astype(np.uint8)
FAST = ("method=flat", "k=10")


def unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_vecs(path, rows: np.ndarray) -> None:
    """TEXMEX: per row an int32 dimension, then the values."""
    header = np.full((len(rows), 1), rows.shape[1], dtype=np.int32).view(np.uint8)
    np.concatenate([header, np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)], axis=1).tofile(path)


def write_bin(path, rows: np.ndarray) -> None:
    """big-ann-benchmarks: int32 count, int32 dimension, then the values."""
    with open(path, "wb") as out:
        np.array(rows.shape, dtype=np.int32).tofile(out)
        np.ascontiguousarray(rows).tofile(out)


def write_hdf5(path, distance: str = "angular") -> None:
    exact = np.argsort(-(unit(QUERIES) @ unit(GALLERY).T), axis=1)[:, :100]
    with h5py.File(path, "w") as handle:
        handle.attrs["distance"] = distance
        handle["train"], handle["test"], handle["neighbors"] = GALLERY, QUERIES, exact


def write_clip_retrieval(folder) -> list[str]:
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    names = [f"images/{i:05d}.jpg" for i in range(len(GALLERY))]
    for part, rows in enumerate((slice(0, 250), slice(250, 600))):
        np.save(folder / "img_emb" / f"img_emb_{part}.npy", GALLERY[rows].astype(np.float16))
        pq.write_table(pa.table({"image_path": names[rows]}), folder / "metadata" / f"metadata_{part}.parquet")
    return names


@pytest.mark.parametrize("name, write, expected", [
    ("g.npy", lambda p: np.save(p, GALLERY), GALLERY),
    ("g16.npy", lambda p: np.save(p, GALLERY.astype(np.float16)), GALLERY.astype(np.float16)),
    ("g.fvecs", lambda p: write_vecs(p, GALLERY), GALLERY),
    ("g.bvecs", lambda p: write_vecs(p, BYTES), BYTES),
    ("g.fbin", lambda p: write_bin(p, GALLERY), GALLERY),
    ("g.u8bin", lambda p: write_bin(p, BYTES), BYTES),
    ("g.hdf5", write_hdf5, GALLERY),
])
def test_every_format_reads_back_row_for_row(tmp_path, name, write, expected):
    write(tmp_path / name)
    source = open_vectors(tmp_path / name)
    assert (source.count, source.dim) == expected.shape
    assert np.array_equal(np.asarray(source.rows[:]), expected)
    assert np.array_equal(np.asarray(source.rows[590:600]), expected[590:600])


def test_a_clip_retrieval_folder_reads_as_one_gallery_across_its_files(tmp_path):
    write_clip_retrieval(tmp_path / "out")
    source = open_vectors(tmp_path / "out")
    assert (source.count, source.dim) == (600, 24)
    assert np.array_equal(np.asarray(source.rows[240:260]), GALLERY[240:260].astype(np.float16)), "across two files"
    assert np.array_equal(source.rows[0:600], GALLERY.astype(np.float16))


@pytest.mark.parametrize("name, content, says", [
    ("short.fvecs", b"\x18\x00\x00\x00" + b"\x00" * 50, "does not divide"),
    ("bad.fbin", np.array([600, 24], np.int32).tobytes() + b"\x00" * 100, "needs"),
    ("text.npy", b"not numpy", "numpy cannot"),
    ("g.txt", b"1 2 3", "not one of"),
])
def test_a_file_that_is_not_what_its_ending_says_is_named(tmp_path, name, content, says):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(VectorFileError, match=says):
        open_vectors(tmp_path / name)


def test_held_out_queries_and_labels_from_a_numpy_file(make_cfg, tmp_path):
    np.save(tmp_path / "g.npy", GALLERY.astype(np.float16))
    labels = RNG.integers(0, 6, len(GALLERY))
    np.save(tmp_path / "labels.npy", labels)
    cfg = make_cfg("data=vectors", f"data.gallery={tmp_path / 'g.npy'}", f"data.gallery_labels={tmp_path / 'labels.npy'}",
                   "data.query_size=40", *FAST)
    stores = ensure_vector_stores(cfg.data, cfg.seed, Path(cfg.paths.cache))
    gallery, queries = stores.gallery, stores.queries
    assert (len(gallery), len(queries), gallery.dim) == (560, 40, 24)
    rows = {split: [int(p.rsplit(":", 1)[1]) for p in store.paths] for split, store in
            (("gallery", gallery), ("queries", queries))}
    assert sorted(rows["gallery"] + rows["queries"]) == list(range(600)), "every row once, in one split"
    source = unit(GALLERY.astype(np.float16))
    assert np.allclose(np.asarray(queries.vectors), source[rows["queries"]], atol=1e-6), "held-out rows, normalised"
    assert np.array_equal(queries.labels, labels[rows["queries"]])
    metrics = run_tracked(cfg)
    assert metrics["recall_at_10"] == 1.0 and metrics["gallery_size"] == 560 and metrics["dim"] == 24
    assert 0.0 < metrics["precision_at_10"] < 1.0
    assert all_runs(cfg.tracking.uri)[0].data.tags["model"] == "vectors"


def test_without_labels_precision_is_not_made_up(make_cfg, tmp_path):
    write_vecs(tmp_path / "g.fvecs", GALLERY)
    write_vecs(tmp_path / "q.fvecs", QUERIES)
    cfg = make_cfg("data=vectors", f"data.gallery={tmp_path / 'g.fvecs'}", f"data.queries={tmp_path / 'q.fvecs'}", *FAST)
    metrics = run_tracked(cfg)
    assert np.isnan(metrics["precision_at_10"]) and metrics["query_size"] == 30 and metrics["recall_at_10"] == 1.0


def test_an_ann_benchmarks_file_is_checked_against_its_own_neighbors(make_cfg, tmp_path):
    write_hdf5(tmp_path / "angular.hdf5")
    cfg = make_cfg("data=vectors", f"data.gallery={tmp_path / 'angular.hdf5'}", "method=ivf", "nlist=8", "nprobe=8")
    metrics = run_tracked(cfg)
    assert metrics["gallery_size"] == 600 and metrics["query_size"] == 30 and metrics["recall_at_10"] == 1.0
    tags = all_runs(cfg.tracking.uri)[0].data.tags
    assert tags["reference_checked"] == "True" and float(tags["reference_agreement"]) == 1.0


def test_an_ann_benchmarks_file_of_another_metric_is_said_not_checked(make_cfg, tmp_path, caplog):
    write_hdf5(tmp_path / "l2.hdf5", distance="euclidean")
    cfg = make_cfg("data=vectors", f"data.gallery={tmp_path / 'l2.hdf5'}", *FAST)
    run_tracked(cfg)
    tags = all_runs(cfg.tracking.uri)[0].data.tags
    assert tags["reference_checked"] == "False" and tags["reference_distance"] == "euclidean"
    assert "euclidean distance" in caplog.text and "not checked" in caplog.text


def test_a_clip_retrieval_folder_keeps_its_image_paths(make_cfg, tmp_path):
    names = write_clip_retrieval(tmp_path / "out")
    cfg = make_cfg("data=vectors", f"data.gallery={tmp_path / 'out'}", "data.query_size=20", *FAST)
    stores = ensure_vector_stores(cfg.data, cfg.seed, Path(cfg.paths.cache))
    assert set(stores.gallery.paths) | set(stores.queries.paths) == set(names)
    assert run_tracked(cfg)["recall_at_10"] == 1.0


@pytest.mark.parametrize("overrides, key", [
    (("data.gallery=/nonexistent/g.npy",), "data.gallery=/nonexistent/g.npy"),
    (("data.gallery={tmp}/g.txt",), "data.gallery="),
    (("data.gallery={tmp}/g.npy", "data.queries={tmp}/q8.npy"), "data.queries="),
    (("data.gallery={tmp}/g.npy", "data.query_size=600"), "data.query_size=600"),
    (("data.gallery={tmp}/g.npy", "data.query_size=10", "data.gallery_labels={tmp}/short_labels.npy"),
     "data.gallery_labels="),
    (("data.gallery={tmp}/g.npy", "data.query_size=10", "method=ivfpq", "method.pq_m=5", "nlist=4", "nprobe=2"),
     "method.pq_m=5"),
    (("data.gallery={tmp}/g.npy", "data.query_size=10", "k=591"), "k=591"),
])
def test_bad_vector_inputs_are_refused_before_any_work(make_cfg, tmp_path, overrides, key):
    np.save(tmp_path / "g.npy", GALLERY)
    np.save(tmp_path / "q8.npy", QUERIES[:, :8])
    np.save(tmp_path / "short_labels.npy", np.zeros(5, dtype=np.int64))
    (tmp_path / "g.txt").write_text("1 2 3")
    with pytest.raises(ConfigError) as error:
        run_tracked(make_cfg("data=vectors", *[o.format(tmp=tmp_path) for o in overrides]))
    assert str(error.value).startswith(key), str(error.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlruns").exists()
