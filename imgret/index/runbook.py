"""A runbook: a gallery that changes under its index, as a sequence of steps over the gallery's rows, in the style of
big-ann-benchmarks' streaming runbooks: `insert` rows, `delete` rows, `search` every query against the rows present
then, `maintain` (an engine's compaction or re-index).

A runbook is written as YAML (`steps:`, each `{operation: insert|delete|search|maintain, ...rows}`), or generated
(`RunbookSettings.kind`: grow, sliding_window, late_class), seeded and reproducible. Rows are named by a range of
gallery rows (`start`, `end`: end exclusive) or by a class (`label`), resolved against the gallery once
(`Runbook.resolve`), and checked before any work: a step that names no row, an insert of a row already present, a
delete of a row not present, a row past the gallery, a runbook that never searches, each refused in one line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgret.errors import ConfigError, bad_value

OPERATIONS = ("insert", "delete", "search", "maintain")
KINDS = ("none", "file", "grow", "sliding_window", "late_class")


@dataclass(frozen=True)
class Step:
    """One step as written: its operation and the rows it names (a range, or a class), none for search/maintain."""
    operation: str
    start: int | None = None
    end: int | None = None
    label: int | None = None

    @classmethod
    def of(cls, number: int, written) -> "Step":
        if not isinstance(written, dict) or written.get("operation") not in OPERATIONS:
            raise bad_value(f"runbook step {number}", written, f"a mapping with operation: one of {', '.join(OPERATIONS)}")
        extra = set(written) - {"operation", "start", "end", "label"}
        if extra:
            raise bad_value(f"runbook step {number}", dict(written), f"operation and start/end or label only, not "
                            f"{', '.join(sorted(extra))}")
        step = cls(written["operation"], written.get("start"), written.get("end"), written.get("label"))
        names_rows = step.operation in ("insert", "delete")
        if names_rows and (step.label is None) == (step.start is None or step.end is None):
            raise bad_value(f"runbook step {number}", dict(written), f"{step.operation}: either start and end (a range "
                            "of gallery rows, end exclusive) or label (a class's rows)")
        if not names_rows and (step.start, step.end, step.label) != (None, None, None):
            raise bad_value(f"runbook step {number}", dict(written), f"{step.operation} names no rows")
        return step

    def rows(self, labels: np.ndarray) -> np.ndarray:
        if self.label is not None:
            return np.flatnonzero(labels == self.label)
        return np.arange(self.start, self.end)

    def written(self) -> dict:
        return {key: value for key, value in (("operation", self.operation), ("start", self.start),
                                              ("end", self.end), ("label", self.label)) if value is not None}


@dataclass(frozen=True)
class ResolvedStep:
    """A step against one gallery: its operation and the gallery rows it inserts or deletes (empty otherwise)."""
    number: int
    operation: str
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass(frozen=True)
class Runbook:
    name: str
    steps: tuple[Step, ...]

    @classmethod
    def of(cls, name: str, written) -> "Runbook":
        if not isinstance(written, (list, tuple)) or not written:
            raise bad_value("runbook.steps", written, "a non-empty list of steps")
        runbook = cls(name, tuple(Step.of(number, step) for number, step in enumerate(written, 1)))
        if not any(step.operation == "search" for step in runbook.steps):
            raise bad_value("runbook.steps", f"{len(runbook.steps)} steps", "at least one search step")
        return runbook

    @classmethod
    def read(cls, path: Path) -> "Runbook":
        import yaml

        try:
            written = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"runbook.file={path}: a readable YAML runbook ({str(error).splitlines()[0]})") from None
        if not isinstance(written, dict) or "steps" not in written:
            raise bad_value("runbook.file", str(path), "a YAML file with `steps:` (imgret/index/runbook.py says how)")
        return cls.of(str(written.get("name") or Path(path).stem), written["steps"])

    @property
    def digest(self) -> str:
        """Names the runbook in cache keys: its steps as written."""
        text = json.dumps([step.written() for step in self.steps], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def resolve(self, labels: np.ndarray) -> list[ResolvedStep]:
        """The steps against a gallery with these labels, each checked against the rows present before it."""
        labels = np.asarray(labels)
        present = np.zeros(len(labels), dtype=bool)
        resolved = []
        for number, step in enumerate(self.steps, 1):
            if step.operation not in ("insert", "delete"):
                resolved.append(ResolvedStep(number, step.operation))
                continue
            if step.start is not None and not 0 <= step.start < step.end <= len(labels):
                raise bad_value(f"runbook step {number}", step.written(),
                                f"0 <= start < end <= the gallery's {len(labels)} rows")
            rows = step.rows(labels)
            if not len(rows):
                raise bad_value(f"runbook step {number}", step.written(), "a step that names at least one row")
            wrong = rows[present[rows]] if step.operation == "insert" else rows[~present[rows]]
            if len(wrong):
                inserting = step.operation == "insert"
                said = "already present" if inserting else "not present (never inserted, or deleted since)"
                raise bad_value(f"runbook step {number}", step.written(), f"rows that are "
                                f"{'absent' if inserting else 'present'} before it: row {int(wrong[0])} is {said}")
            present[rows] = step.operation == "insert"
            resolved.append(ResolvedStep(number, step.operation, rows.astype(np.int64)))
        return resolved


def grow(rows: int, start_share: float = 0.5, steps: int = 5) -> Runbook:
    """Half the gallery (`start_share`), then the rest in `steps` equal inserts, a search after each."""
    first = max(1, int(rows * start_share))
    bounds = np.linspace(first, rows, steps + 1).round().astype(int)
    written = [{"operation": "insert", "start": 0, "end": first}, {"operation": "search"}]
    for low, high in zip(bounds[:-1], bounds[1:]):
        if high > low:
            written += [{"operation": "insert", "start": int(low), "end": int(high)}, {"operation": "search"}]
    return Runbook.of("grow", written)


def sliding_window(rows: int, window_share: float = 0.5, steps: int = 5) -> Runbook:
    """A window of `window_share` of the gallery that slides to its end in `steps`: each step inserts the next rows
    and deletes as many of the oldest, then searches."""
    window = max(1, int(rows * window_share))
    stride = max(1, (rows - window) // steps)
    written = [{"operation": "insert", "start": 0, "end": window}, {"operation": "search"}]
    low, high = 0, window
    while high + stride <= rows:
        written += [{"operation": "insert", "start": high, "end": high + stride},
                    {"operation": "delete", "start": low, "end": low + stride}, {"operation": "search"}]
        low, high = low + stride, high + stride
    return Runbook.of("sliding_window", written)


def late_class(labels: np.ndarray, seed: int) -> Runbook:
    """Every row but one class's (chosen by `seed`), searched; then that class arrives, searched again."""
    classes = np.unique(np.asarray(labels))
    late = int(np.random.default_rng(seed).choice(classes))
    written = []
    for start, end in _runs_without(np.asarray(labels), late):
        written.append({"operation": "insert", "start": start, "end": end})
    written += [{"operation": "search"}, {"operation": "insert", "label": late}, {"operation": "search"}]
    return Runbook.of(f"late_class{late}", written)


def _runs_without(labels: np.ndarray, late: int) -> list[tuple[int, int]]:
    """The ranges of consecutive rows whose class is not `late`."""
    keep = np.concatenate([[False], labels != late, [False]])
    edges = np.flatnonzero(np.diff(keep.astype(np.int8)))
    return [(int(start), int(end)) for start, end in zip(edges[::2], edges[1::2])]


@dataclass(frozen=True)
class RunbookSettings:
    """runbook=none | file (runbook.file) | grow | sliding_window | late_class, as conf/runbook/<kind>.yaml says."""
    kind: str = "none"
    file: str | None = None
    start_share: float = 0.5
    window_share: float = 0.5
    steps: int = 5

    @classmethod
    def of(cls, section) -> "RunbookSettings":
        section = dict(section or {})
        kind = section.get("kind", "none")
        if kind not in KINDS:
            raise bad_value("runbook.kind", kind, f"one of {', '.join(KINDS)} (runbook=grow, runbook=file ...)")
        for key in ("start_share", "window_share"):
            value = section.get(key, 0.5)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise bad_value(f"runbook.{key}", value, "a share of the gallery in (0, 1)")
        steps = section.get("steps", 5)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise bad_value("runbook.steps", steps, "a whole number of update steps >= 1")
        if kind == "file" and not section.get("file"):
            raise bad_value("runbook.file", section.get("file"), "the path of a YAML runbook")
        return cls(kind, section.get("file"), float(section.get("start_share", 0.5)),
                   float(section.get("window_share", 0.5)), int(steps))

    def runbook(self, labels: np.ndarray, seed: int) -> Runbook | None:
        rows = len(labels)
        if self.kind == "none":
            return None
        if self.kind == "file":
            return Runbook.read(Path(self.file))
        if self.kind == "grow":
            return grow(rows, self.start_share, self.steps)
        if self.kind == "sliding_window":
            return sliding_window(rows, self.window_share, self.steps)
        return late_class(labels, seed)
