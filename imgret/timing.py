"""Where a run's time and memory go: stage stopwatches and the peak resident set while a run works."""
from __future__ import annotations

import contextlib
import threading
import time

import psutil


class StageTimes(dict):
    """Seconds per named stage, e.g. times["groundtruth_s"]."""

    @contextlib.contextmanager
    def measure(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


class PeakResidentSet:
    """The largest resident set of this process while the block runs, sampled every `interval_s` (a run in a
    sweep shares its process with earlier runs, so the process-wide maximum of getrusage would not do)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakResidentSet":
        self._sample()
        self._thread = threading.Thread(target=self._watch, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
