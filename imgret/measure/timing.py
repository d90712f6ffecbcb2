"""Where a run's time and memory go: stage stopwatches and the peak resident set while a run works."""
from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path

import psutil


class StageTimes(dict):
    """Seconds per named stage, e.g. times["groundtruth_s"]; with a PeakResidentSet, each stage's own peak too."""

    def __init__(self, memory: "PeakResidentSet | None" = None):
        super().__init__()
        self.memory = memory
        self.peak_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def measure(self, name: str):
        if self.memory is not None:
            self.memory.restart()
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start
            if self.memory is not None:
                self.peak_bytes[name] = self.memory.stage_peak_bytes()

    def describe_peaks(self) -> str:
        """e.g. 'stores_s 1.2 GB, groundtruth_s 1.9 GB': the largest resident set during each stage."""
        return ", ".join(f"{name.removesuffix('_s')} {peak / 1e9:.2f} GB" for name, peak in self.peak_bytes.items())


def high_water_bytes() -> int:
    """The kernel's peak resident set of this process so far (VmHWM); 0 where /proc does not say."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakResidentSet:
    """The largest resident set of this process while the block runs (a run in a sweep shares its process with
    earlier runs, so the process-wide maximum of getrusage would not do), sampled every `interval_s`, and at each
    sample the kernel's own peak of the process where it rose since the sample before: a peak between two samples
    (a timed section's, when no thread samples) is then counted whenever it is the process's largest yet. The
    kernel's peak is only read, never reset, so /usr/bin/time and getrusage still see the whole process's."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stage_peak = 0
        self._process = psutil.Process()
        self._high_water = high_water_bytes()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # None while paused and outside the block

    def _sample(self) -> None:
        rss = self._process.memory_info().rss
        high_water = high_water_bytes()
        if high_water > self._high_water:  # the process's peak rose since the last sample, within this block
            rss, self._high_water = max(rss, high_water), high_water
        self.peak_bytes = max(self.peak_bytes, rss)
        self._stage_peak = max(self._stage_peak, rss)

    def restart(self) -> None:
        """Start a new stage: its peak is counted from the resident set now."""
        self._sample()  # what rose since the last sample belongs to the stage before
        self._stage_peak = 0
        self._sample()

    def stage_peak_bytes(self) -> int:
        self._sample()
        return self._stage_peak

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self._sample()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(self._stop,), name="peak-rss", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @contextlib.contextmanager
    def paused(self):
        """No sampling thread while the block runs (a timed section must not share the CPU with it): one sample
        before and one after it instead, the kernel's peak with them."""
        self._halt()
        try:
            yield
        finally:
            self._sample()
            self._start()

    def __enter__(self) -> "PeakResidentSet":
        self._high_water = high_water_bytes()  # a peak reached before the block is not the block's
        self._sample()
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt()


def best_seconds(function, repeats: int) -> float:
    """The fastest of `repeats` calls: the one least disturbed by other work on the machine."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved(alternatives: dict, rounds: int) -> dict[str, list]:
    """Each alternative's figure (a callable's return: a number, or a tuple of them), measured A, B, B, A, A, B, ...
    for `rounds` rounds, so that a change in the machine's load during the measurement falls on every alternative
    alike, and going first (or right after the other) favours none of them."""
    figures: dict[str, list] = {name: [] for name in alternatives}
    for round_ in range(rounds):
        turn = list(alternatives.items())
        for name, measure in (turn if round_ % 2 == 0 else turn[::-1]):
            figures[name].append(measure())
    return figures


def spread(values) -> tuple[float, float, float]:
    """(median, min, max) of a list of figures."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return median, ordered[0], ordered[-1]


def best_rate(call, work, seconds: float, smallest: int = 256, largest: int = 4096) -> float:
    """The best `work(n)` per second of `call(n)` within `seconds`, at the largest size n = smallest, 2 x smallest,
    ... up to `largest` that fits: one call a size while a call of the next size, estimated from this one's (a
    first call, so no faster than those after it), fits twice in what is left; then calls of that size until the
    budget is spent. No call starts that its predecessor says cannot end in time, however slow the path (a
    precision the CPU emulates, say)."""
    deadline = time.perf_counter() + seconds
    size = smallest

    def timed() -> float:
        start = time.perf_counter()
        call(size)
        return time.perf_counter() - start

    took = timed()
    best = work(size) / took
    while size * 2 <= largest and time.perf_counter() + 2 * took * work(size * 2) / work(size) <= deadline:
        size *= 2
        took = timed()
        best = max(best, work(size) / took)
    while time.perf_counter() + took <= deadline:
        took = timed()
        best = max(best, work(size) / took)
    return best
