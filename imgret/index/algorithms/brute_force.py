"""Brute force: exact cosine by matrix products (imgret's own, numpy BLAS and torch.topk)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imgret.index.base import Method, SearchIndex, whole_params
from imgret.index.brute import BruteForceIndex


class BruteForce(Method):
    name = "brute"
    label = "brute force"
    marker = "*"
    exact = True
    cached = False  # nothing to build: the gallery itself
    query_params = ("query_chunk", "resident_mb")
    execution_params = ("query_chunk", "resident_mb")

    def check(self, opts: Mapping, gallery_size: int | None, dim: int | None) -> None:
        whole_params(opts, ("query_chunk",), 1)
        if opts.get("resident_mb") is not None:
            whole_params(opts, ("resident_mb",), 0)

    def build(self, opts: Mapping, gallery: np.ndarray, threads: int, path: Path | None = None) -> Any:
        return gallery

    def searcher(self, native: Any, setting: Mapping, device: str = "cpu") -> SearchIndex:
        return BruteForceIndex(native, int(setting.get("query_chunk") or 1024), device,
                               int(setting.get("resident_mb", 1024)) << 20)


METHODS = (BruteForce(),)
