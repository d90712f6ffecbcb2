"""Runbooks (a gallery that changes under its index): the exact neighbours at every search step equal numpy's float64
top-10 over the rows present then, for the generated runbooks and a written one with deletes and re-inserts (rows
that tie included); the steps are computed incrementally where that holds; bad runbooks are refused in one line."""
from __future__ import annotations

import numpy as np
import pytest

from imgret.errors import ConfigError
from imgret.index import stream_truth
from imgret.index.runbook import Runbook, RunbookSettings, grow, late_class, sliding_window
from imgret.index.stream_truth import step_ground_truth

K = 10


def data(rows: int = 3000, dim: int = 16, queries: int = 40, seed: int = 5):
    rng = np.random.default_rng(seed)
    gallery = rng.normal(size=(rows, dim)).astype(np.float32)
    gallery[1::97] = gallery[0::97][:len(gallery[1::97])]  # exact duplicates: rows whose scores tie
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    probe = gallery[rng.choice(rows, queries, replace=False)] + 0.05 * rng.normal(size=(queries, dim)).astype(np.float32)
    labels = rng.integers(0, 12, rows)
    labels[1500:] = np.where(labels[1500:] == 3, 4, labels[1500:])  # class 3: rows the written runbook deletes first
    return gallery, probe.astype(np.float32), labels


def numpy_truth(gallery: np.ndarray, queries: np.ndarray, present: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(present)
    ids = np.full((len(queries), K), -1)
    similarities = queries.astype(np.float64) @ gallery[rows].astype(np.float64).T
    for q in range(len(queries)):
        best = rows[np.lexsort((rows, -similarities[q]))][:K]
        ids[q, :len(best)] = best
    return ids


WRITTEN = [{"operation": "insert", "start": 0, "end": 6}, {"operation": "search"},  # fewer rows than k
           {"operation": "insert", "start": 6, "end": 2000}, {"operation": "search"},
           {"operation": "delete", "start": 0, "end": 1500}, {"operation": "search"},  # most lists emptied
           {"operation": "insert", "label": 3}, {"operation": "maintain"}, {"operation": "search"},
           {"operation": "delete", "label": 3}, {"operation": "insert", "start": 0, "end": 700}, {"operation": "search"}]


@pytest.mark.parametrize("kind", ["grow", "sliding_window", "late_class", "written"])
def test_the_ground_truth_at_every_search_step_equals_numpy_over_the_rows_present(kind):
    gallery, queries, labels = data()
    runbook = {"grow": lambda: grow(len(gallery), 0.5, 4), "sliding_window": lambda: sliding_window(len(gallery), 0.4, 4),
               "late_class": lambda: late_class(labels, seed=1),
               "written": lambda: Runbook.of("written", WRITTEN)}[kind]()
    steps = runbook.resolve(labels)
    truths = step_ground_truth(gallery, queries, steps, K)
    present = np.zeros(len(gallery), dtype=bool)
    searched = 0
    for step in steps:
        if step.operation in ("insert", "delete"):
            present[step.rows] = step.operation == "insert"
        if step.operation == "search":
            expected = numpy_truth(gallery, queries, present)
            assert np.array_equal(truths[step.number].ids, expected), (kind, step.number)
            found = truths[step.number]
            assert np.allclose(np.where(expected >= 0, found.scores, 0), np.where(
                expected >= 0, np.take_along_axis(queries @ gallery.T, np.maximum(expected, 0), 1), 0), atol=1e-5)
            searched += 1
    assert searched == sum(step.operation == "search" for step in steps) >= 2


def test_a_growing_gallery_is_answered_from_the_lists_without_computing_again(monkeypatch):
    gallery, queries, labels = data()
    recomputed = []
    original = stream_truth.exact_filtered_top_k
    monkeypatch.setattr(stream_truth, "exact_filtered_top_k",
                        lambda gallery, queries, *rest: recomputed.append(len(queries)) or original(gallery, queries,
                                                                                                   *rest))
    step_ground_truth(gallery, queries, grow(len(gallery), 0.5, 4).resolve(labels), K)
    assert sum(recomputed) == 0, "inserts alone never need a query computed again"
    step_ground_truth(gallery, queries, Runbook.of("written", WRITTEN).resolve(labels), K)
    assert 0 < sum(recomputed) < len(queries) * 5, "deletes recompute only the queries that lost a neighbour"


def test_generated_runbooks_are_reproducible_and_named_by_their_steps():
    labels = np.repeat(np.arange(10), 50)
    assert grow(500).digest == grow(500).digest != grow(500, steps=4).digest
    assert late_class(labels, seed=3).steps == late_class(labels, seed=3).steps
    window = sliding_window(500, 0.5, 5).resolve(labels)
    present = np.zeros(500, dtype=bool)
    for step in window:
        if step.operation in ("insert", "delete"):
            present[step.rows] = step.operation == "insert"
        if step.operation == "search":
            assert present.sum() == 250  # the window keeps its size


def test_a_written_runbook_is_read_from_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nsteps:\n  - {operation: insert, start: 0, end: 10}\n  - {operation: search}\n")
    runbook = RunbookSettings.of({"kind": "file", "file": str(path)}).runbook(np.zeros(10), seed=0)
    assert runbook.name == "mine" and [step.operation for step in runbook.steps] == ["insert", "search"]


@pytest.mark.parametrize("steps, line", [
    ([{"operation": "delete", "start": 0, "end": 5}, {"operation": "search"}],
     "runbook step 1={'operation': 'delete', 'start': 0, 'end': 5}: rows that are present before it: row 0 is not "
     "present (never inserted, or deleted since)"),
    ([{"operation": "insert", "start": 0, "end": 5}, {"operation": "insert", "start": 4, "end": 8},
      {"operation": "search"}],
     "runbook step 2={'operation': 'insert', 'start': 4, 'end': 8}: rows that are absent before it: row 4 is already "
     "present"),
    ([{"operation": "insert", "label": 99}, {"operation": "search"}],
     "runbook step 1={'operation': 'insert', 'label': 99}: a step that names at least one row"),
    ([{"operation": "insert", "start": 0, "end": 500}, {"operation": "search"}],
     "runbook step 1={'operation': 'insert', 'start': 0, 'end': 500}: 0 <= start < end <= the gallery's 100 rows"),
    ([{"operation": "insert", "start": 0, "end": 5}],
     "runbook.steps=1 steps: at least one search step"),
    ([{"operation": "upsert"}, {"operation": "search"}],
     "runbook step 1={'operation': 'upsert'}: a mapping with operation: one of insert, delete, search, maintain"),
    ([{"operation": "search", "start": 0}],
     "runbook step 1={'operation': 'search', 'start': 0}: search names no rows"),
])
def test_a_bad_runbook_is_refused_in_one_line(steps, line):
    with pytest.raises(ConfigError) as refused:
        Runbook.of("bad", steps).resolve(np.zeros(100, dtype=np.int64))
    assert str(refused.value) == line and "\n" not in str(refused.value)
