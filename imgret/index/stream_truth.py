"""The exact neighbours at every search step of a runbook: each query's k most similar rows among those present then,
exact in float64 (ties by the lower id), computed incrementally.

Each query keeps a list of candidates (its best rows found so far, float32 products, at most CANDIDATES of them) and a
floor: every present row not on the list scores at most the floor. An insert scores the new rows against every
query and merges them in (the rows pushed off the list raise the floor); a delete takes the rows off the lists. At a
search step a query whose list holds k candidates clearly above its floor (by FLOOR_MARGIN, past float32's error) is
answered from its list, re-ranked in float64; any other query is computed again over all present rows (the filtered
ground truth's exact scan, with presence as its filter), which also refills its list and lowers its floor."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgret.index.filters import RowFilter
from imgret.index.groundtruth import GroundTruth, exact_filtered_top_k
from imgret.index.runbook import ResolvedStep
from imgret.mapped import gather_rows

CANDIDATES = 40  # rows kept per query between steps (k + margin for the deletes ahead)
FLOOR_MARGIN = 1e-5  # a candidate above the floor by less than this may trail an unlisted row in float64
QUERY_CHUNK = 1024


@dataclass
class Candidates:
    """Every query's best rows so far (ids -1 and scores -inf past them) and its floor."""
    ids: np.ndarray  # (queries, CANDIDATES) int64
    scores: np.ndarray  # (queries, CANDIDATES) float32, best first
    floor: np.ndarray  # (queries,) float32: no present row off the list scores above it

    @classmethod
    def empty(cls, queries: int, depth: int) -> "Candidates":
        return cls(np.full((queries, depth), -1, dtype=np.int64), np.full((queries, depth), -np.inf, dtype=np.float32),
                   np.full(queries, -np.inf, dtype=np.float32))

    def merge(self, rows: np.ndarray, gallery: np.ndarray, queries: np.ndarray) -> None:
        """Rows inserted: scored against every query and merged into its list."""
        depth = self.ids.shape[1]
        for start in range(0, len(rows), 65536):
            block = rows[start:start + 65536]
            vectors = gather_rows(gallery, block).astype(np.float32, copy=False)
            for q in range(0, len(queries), QUERY_CHUNK):
                scores = np.concatenate([self.scores[q:q + QUERY_CHUNK], queries[q:q + QUERY_CHUNK] @ vectors.T], axis=1)
                ids = np.concatenate([self.ids[q:q + QUERY_CHUNK], np.broadcast_to(block, (len(scores), len(block)))],
                                     axis=1)
                order = np.argsort(-scores, axis=1, kind="stable")
                kept, dropped = order[:, :depth], order[:, depth:]
                if dropped.shape[1]:
                    pushed = np.take_along_axis(scores, dropped, axis=1).max(axis=1)
                    self.floor[q:q + QUERY_CHUNK] = np.maximum(self.floor[q:q + QUERY_CHUNK], pushed)
                self.scores[q:q + QUERY_CHUNK] = np.take_along_axis(scores, kept, axis=1)
                self.ids[q:q + QUERY_CHUNK] = np.take_along_axis(ids, kept, axis=1)

    def remove(self, rows: np.ndarray) -> None:
        """Rows deleted: off every list (the lists stay in order, the gaps at their ends)."""
        gone = np.isin(self.ids, rows)
        self.scores[gone], self.ids[gone] = -np.inf, -1
        order = np.argsort(-self.scores, axis=1, kind="stable")
        self.scores = np.take_along_axis(self.scores, order, axis=1)
        self.ids = np.take_along_axis(self.ids, order, axis=1)

    def settled(self, k: int, present: int) -> np.ndarray:
        """The queries whose top k (or all present rows, if fewer) are on their lists, clear of their floors."""
        need = min(k, present)
        if need == 0:
            return np.ones(len(self.ids), dtype=bool)
        return self.scores[:, need - 1] > self.floor + FLOOR_MARGIN


def step_ground_truth(gallery: np.ndarray, queries: np.ndarray, steps: list[ResolvedStep], k: int
                      ) -> dict[int, GroundTruth]:
    """{search step's number: the exact top-k among the rows present at it}, -1 and -inf past the rows present."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    present = np.zeros(len(gallery), dtype=np.int64)
    lists = Candidates.empty(len(queries), min(len(gallery), max(CANDIDATES, k + 10)))
    truths = {}
    for step in steps:
        if step.operation == "insert":
            present[step.rows] = 1
            lists.merge(step.rows, gallery, queries)
        elif step.operation == "delete":
            present[step.rows] = 0
            lists.remove(step.rows)
        elif step.operation == "search":
            truths[step.number] = _answer(gallery, queries, lists, present, k)
    return truths


def _answer(gallery: np.ndarray, queries: np.ndarray, lists: Candidates, present: np.ndarray, k: int) -> GroundTruth:
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    settled = lists.settled(k, int(present.sum()))
    for q in np.flatnonzero(settled):  # from the list, re-ranked in float64
        listed = lists.ids[q][lists.ids[q] >= 0]
        if len(listed):
            exact = gather_rows(gallery, listed).astype(np.float64) @ queries[q].astype(np.float64)
            order = np.lexsort((listed, -exact))[:k]
            ids[q, :len(order)], scores[q, :len(order)] = listed[order], exact[order]
    again = np.flatnonzero(~settled)
    if len(again):  # over every present row, and the lists refilled from it
        depth = lists.ids.shape[1]
        presence = RowFilter("presence", float(present.mean()), present, np.ones(len(again), dtype=np.int64),
                             np.full(len(again), 2, dtype=np.int64))
        found_scores, found_ids = exact_filtered_top_k(gallery, queries[again], presence, depth)
        ids[again], scores[again] = found_ids[:, :k], found_scores[:, :k]
        lists.ids[again], lists.scores[again] = found_ids, found_scores
        # every present row off the refilled list scores at most its last entry (or none is left: -inf)
        full = (found_ids >= 0).all(axis=1)
        lists.floor[again] = np.where(full, found_scores[:, -1], -np.inf)
    return GroundTruth(ids, scores)
