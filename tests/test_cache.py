"""Reading memory-mapped stores without letting them fill the resident set: rows gathered with pread, pages
handed back; both must address the right bytes for slices of a map too."""
from __future__ import annotations

import numpy as np
import psutil

from imgret.mapped import gather_rows, release_pages


def mapped(tmp_path, rows: int = 3000, dim: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    values = np.random.default_rng(1).normal(size=(rows, dim)).astype(np.float32)
    np.save(tmp_path / "vectors.npy", values)
    return values, np.load(tmp_path / "vectors.npy", mmap_mode="r")


def test_gathered_rows_are_the_rows_of_the_map_and_of_its_slices(tmp_path):
    values, vectors = mapped(tmp_path)
    rows = np.array([2999, 0, 17, 17, 1500])
    assert np.array_equal(gather_rows(vectors, rows), values[rows])
    assert np.array_equal(gather_rows(vectors[1000:], rows[1:] % 2000), values[1000:][rows[1:] % 2000])
    assert np.array_equal(gather_rows(np.ascontiguousarray(vectors), rows), values[rows]), "a view of the map"
    assert np.array_equal(gather_rows(values, rows), values[rows]), "an array in memory is indexed as usual"


def test_gathering_scattered_rows_does_not_map_the_file(tmp_path):
    _, vectors = mapped(tmp_path, rows=20000)  # 80 MB
    process = psutil.Process()
    rows = np.random.default_rng(2).choice(len(vectors), 400, replace=False)
    before = process.memory_info().rss
    gather_rows(vectors, rows)
    gathered = process.memory_info().rss - before
    vectors[np.sort(rows)].sum()  # the same rows through the map
    mapped_growth = process.memory_info().rss - before - gathered
    assert gathered < 8e6, "400 rows of 4 KB read into a 1.6 MB array"
    assert mapped_growth > gathered, "through the map, each row brings at least its page, usually more"


def test_released_pages_leave_the_resident_set_for_a_slice_too(tmp_path):
    _, vectors = mapped(tmp_path, rows=20000)
    process = psutil.Process()
    before = process.memory_info().rss
    part = vectors[5000:15000]
    float(part.sum())  # 40 MB of the file paged in
    assert process.memory_info().rss - before > 30e6
    release_pages(part)
    assert process.memory_info().rss - before < 5e6


def test_a_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    import imgret.cache as cache

    hashed = []
    real = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda path: hashed.append(path) or real(path))
    (tmp_path / "f.bin").write_bytes(b"a" * 1000)
    recorded = {"f.bin": {"bytes": 1000, "digest": real(tmp_path / "f.bin")}}
    assert cache.damage(tmp_path, recorded) is None and cache.damage(tmp_path, recorded) is None
    assert len(hashed) == 1, "the second check of an unchanged file reuses the first one's digest"
    (tmp_path / "f.tmp").write_bytes(b"b" * 1000)  # the same size, another file renamed over it: hashed again
    (tmp_path / "f.tmp").replace(tmp_path / "f.bin")
    assert "does not match its checksum" in cache.damage(tmp_path, recorded) and len(hashed) == 2
