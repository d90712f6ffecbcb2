"""Filtered search: each query may return only the gallery rows a condition allows.

Every filter is one shape, a key per gallery row and a range per query (a row is allowed when low <= key < high),
so the ground truth, the methods' own filters and the checks read it alike:
- `label`: the key is the row's class, the range the query's own class (1/200 of Tiny-ImageNet's gallery);
- `attribute`: the key is a whole number in [0, ATTRIBUTE_RANGE) drawn from the row's id (a hash: the same row has
  the same attribute in every run, whatever the gallery's size or the run's seed), the range a window of
  `selectivity * ATTRIBUTE_RANGE` values placed per query (from the query's id and `seed`), like a date range.

A method searches with its own filter where it has one (FAISS's IDSelector, hnswlib's filter function, brute force
over the allowed rows, a database's `WHERE` or filter over the `RowKeys` it stores with its rows) and otherwise
post-filters a deeper search: `post_filter_depth` results, the allowed ones kept.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from imgret.errors import bad_value, number

ATTRIBUTE_RANGE = 1_000_000
# A row's attribute is a property of the row (like its date), the same in every run and every index that stores it;
# the seed of a run places the queries' windows only.
ROW_ATTRIBUTE_SEED = 0
FILTER_KINDS = ("none", "label", "attribute")
POST_FILTER_SAFETY = 2.0  # a post-filtered search asks for k / selectivity times this


def mixed(values: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 of each value under `seed`: uniform 64-bit words, reproducible from the value alone."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_attributes(rows: int, seed: int) -> np.ndarray:
    """Each gallery row's attribute: a whole number in [0, ATTRIBUTE_RANGE) from its id and `seed`."""
    return (mixed(np.arange(rows), seed) % np.uint64(ATTRIBUTE_RANGE)).astype(np.int64)


@dataclass(frozen=True)
class RowFilter:
    kind: str  # "label" or "attribute"
    selectivity: float  # the share of the gallery each query may return, on average over the queries (realised)
    keys: np.ndarray  # (gallery rows,) int64
    low: np.ndarray  # (queries,) int64
    high: np.ndarray  # (queries,) int64, exclusive
    asked: float | None = None  # an attribute filter's window, as a share of the attribute's values (its nominal width)

    def allows(self, query_ids: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """Whether each row id (broadcast against its query's id) is allowed; -1 (no result) never is."""
        keys = self.keys[np.maximum(row_ids, 0)]
        return (row_ids >= 0) & (keys >= self.low[query_ids]) & (keys < self.high[query_ids])

    def allowed_counts(self, query_ids: np.ndarray) -> np.ndarray:
        """How many gallery rows each of these queries may return."""
        ordered = self.ordered_keys
        return np.searchsorted(ordered, self.high[query_ids]) - np.searchsorted(ordered, self.low[query_ids])

    @functools.cached_property
    def ordered_keys(self) -> np.ndarray:
        return np.sort(self.keys)

    def allowed(self, query_id: int) -> np.ndarray:
        """The gallery rows query `query_id` may return, as a boolean mask."""
        return (self.keys >= self.low[query_id]) & (self.keys < self.high[query_id])

    def block(self, query_ids: np.ndarray, start: int, stop: int) -> np.ndarray:
        """(queries, rows start..stop) boolean mask: what each of these queries may return of these rows."""
        keys = self.keys[start:stop][None, :]
        return (keys >= self.low[query_ids, None]) & (keys < self.high[query_ids, None])

    @functools.cached_property
    def keys_digest(self) -> str:
        """Names the rows' keys alone (what a database stores with its rows: `RowKeys`)."""
        return keys_digest(self.keys)

    def where(self, query_id: int) -> "Where":
        """Query `query_id`'s condition, as a database's own filter states it."""
        share = float(self.allowed_counts(np.array([query_id]))[0]) / max(len(self.keys), 1)
        return Where(self.kind, int(self.low[query_id]), int(self.high[query_id]), share)

    @property
    def digest(self) -> str:
        """Names the filter in cache keys: its kind and every row's and query's bounds."""
        digest = hashlib.sha256(self.kind.encode())
        for array in (self.keys, self.low, self.high):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()[:12]

    def describe(self) -> str:
        if self.kind == "label":
            return f"the query's own class ({self.selectivity:.2%} of the gallery on average)"
        return f"an attribute range of {self.asked:.2%} of its values, keeping {self.selectivity:.2%} of the gallery"


def keys_digest(keys: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(keys, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Where:
    """One query's condition as a database states it: `column` (label or attribute) in [low, high)."""
    column: str
    low: int
    high: int
    share: float = 1.0  # of the rows it allows (an engine that bounds its filtering effort scales that effort by it)


@dataclass(frozen=True)
class RowKeys:
    """What a database stores with each row for its own filters: the row's class (-1 where the gallery has none) and
    its attribute, under the columns `label` and `attribute` (a `RowFilter`'s kind names the one it reads)."""
    label: np.ndarray  # (rows,) int64
    attribute: np.ndarray  # (rows,) int64

    @classmethod
    def of(cls, labels) -> "RowKeys":
        labels = np.asarray(labels, dtype=np.int64)
        return cls(labels, row_attributes(len(labels), ROW_ATTRIBUTE_SEED))

    @classmethod
    def unlabelled(cls, rows: int) -> "RowKeys":
        return cls.of(np.full(rows, -1, dtype=np.int64))

    def digests(self) -> dict[str, str]:
        """Each column's digest: what a database records, and checks a filter's keys against."""
        return {"label": keys_digest(self.label), "attribute": keys_digest(self.attribute)}

    @property
    def digest(self) -> str:
        """Names both columns in the index cache's keys."""
        digests = self.digests()
        return hashlib.sha256(f"{digests['label']}:{digests['attribute']}".encode()).hexdigest()[:12]


def label_filter(gallery_labels: np.ndarray, query_labels: np.ndarray) -> RowFilter:
    keys = np.asarray(gallery_labels, dtype=np.int64)
    low = np.asarray(query_labels, dtype=np.int64)
    counts = np.bincount(keys[keys >= 0], minlength=int(max(keys.max(initial=0), low.max(initial=0))) + 1)
    share = float(counts[np.maximum(low, 0)].mean() / max(len(keys), 1)) if len(low) else 0.0
    return RowFilter("label", share, keys, low, low + 1)


def attribute_filter(gallery_size: int, query_count: int, selectivity: float, seed: int) -> RowFilter:
    """Each query's window of `selectivity * ATTRIBUTE_RANGE` attribute values, placed by `seed` (the rows'
    attributes are `row_attributes(rows, ROW_ATTRIBUTE_SEED)` whatever the seed); the filter's selectivity is the
    share of the gallery the windows realise, on average over the queries (the nominal width drawn on a finite
    gallery keeps a little more or less)."""
    width = max(1, round(selectivity * ATTRIBUTE_RANGE))
    low = (mixed(np.arange(query_count), seed + 1) % np.uint64(ATTRIBUTE_RANGE - width + 1)).astype(np.int64)
    keys = row_attributes(gallery_size, ROW_ATTRIBUTE_SEED)
    ordered = np.sort(keys)
    allowed = np.searchsorted(ordered, low + width) - np.searchsorted(ordered, low)
    share = float(allowed.mean() / max(gallery_size, 1)) if query_count else 0.0
    return RowFilter("attribute", share, keys, low, low + width, width / ATTRIBUTE_RANGE)


@dataclass(frozen=True)
class FilterSettings:
    """filter=none | label | attribute (with its selectivity), as conf/filter/<kind>.yaml says."""
    kind: str = "none"
    selectivity: float | None = None

    @staticmethod
    def check_section(section) -> None:
        """filter=none | label | attribute with a selectivity in (0, 1]: the group's keys, as written."""
        kind, selectivity = section.get("kind", "none"), section.get("selectivity")
        if kind not in FILTER_KINDS:
            raise bad_value("filter.kind", kind, f"one of {', '.join(FILTER_KINDS)} (filter=label, filter=attribute)")
        if kind == "attribute" and not (number(selectivity) and 0 < selectivity <= 1):
            raise bad_value("filter.selectivity", selectivity, "the share of the gallery each query may return, in (0, 1]")
        if kind != "attribute" and selectivity is not None:
            raise bad_value("filter.selectivity", selectivity, f"null for filter={kind} (only filter=attribute takes one)")

    @classmethod
    def of(cls, section) -> "FilterSettings":
        section = section or {}
        return cls(str(section.get("kind", "none")), section.get("selectivity"))

    def rows_for(self, gallery_labels: np.ndarray, query_labels: np.ndarray, seed: int) -> RowFilter | None:
        if self.kind == "label":
            return label_filter(gallery_labels, query_labels)
        if self.kind == "attribute":
            return attribute_filter(len(gallery_labels), len(query_labels), float(self.selectivity), seed)
        return None


def post_filter_depth(k: int, row_filter: RowFilter) -> int:
    """How deep a method without a filter of its own searches: k / selectivity, times the safety factor, at most
    the gallery."""
    return min(len(row_filter.keys), max(k, math.ceil(k / max(row_filter.selectivity, 1e-9) * POST_FILTER_SAFETY)))


def keep_allowed(row_filter: RowFilter, query_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Of a deeper search's results, each query's first k allowed ones, in their order; padded with -inf and -1."""
    allowed = row_filter.allows(query_ids[:, None], ids)
    order = np.argsort(~allowed, axis=1, kind="stable")[:, :k]  # the allowed first, in their order
    kept_ids = np.take_along_axis(ids, order, axis=1)
    kept_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    missing = ~np.take_along_axis(allowed, order, axis=1)
    kept_ids[missing], kept_scores[missing] = -1, -np.inf
    if kept_ids.shape[1] < k:  # fewer results than k at all
        pad = k - kept_ids.shape[1]
        kept_ids = np.pad(kept_ids, ((0, 0), (0, pad)), constant_values=-1)
        kept_scores = np.pad(kept_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return kept_scores, kept_ids.astype(np.int64)
