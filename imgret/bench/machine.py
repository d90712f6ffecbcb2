"""The machine's limits the parts measure against, the archive of real images, and what every part is given
(`Context`)."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgret.measure.timing import best_rate


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # imgret/bench/machine.py -> the checkout

DEFAULT_ARCHIVE = PROJECT_ROOT.parent / "shared" / "data" / "tiny-imagenet-200.zip"

def compose_cfg(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("imgret.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))

def matmul_peak_gflops(seconds: float = 4.0) -> dict[str, float]:
    """Best fp32 GEMM rate over square products, through torch (MKL) and numpy (OpenBLAS): the machine's
    peak is the better of the two, so a ratio against it cannot flatter whichever one imgret uses. Each library
    gets half of `seconds`, its product sizes grown only while they fit (`best_rate`)."""
    makers = {"torch": torch.randn, "numpy": lambda *shape: np.random.rand(*shape).astype(np.float32)}
    rates = {}
    for library, make in makers.items():
        operands = {}

        def product(n, make=make, operands=operands):
            a, b = operands.setdefault(n, (make(n, n), make(n, n)))
            a @ b

        rates[library] = best_rate(product, lambda n: 2 * n ** 3 / 1e9, seconds / 2)
    return rates


def memory_bandwidth_gbs(megabytes: int = 1024, seconds: float = 1.0) -> float:
    """Read bandwidth: the best rate of summing a buffer far larger than every cache, over `seconds`."""
    buffer = torch.ones(megabytes * 1024 * 1024 // 4)
    buffer.sum()
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        buffer.sum()
        best = max(best, buffer.numel() * 4 / (time.perf_counter() - start) / 1e9)
        if time.perf_counter() >= deadline:
            return best

@dataclass(frozen=True)
class Archive:
    """The Tiny-ImageNet zip the image parts read, and its sha256 when it is not the official one (a subset)."""
    path: Path
    checksum: str | None = None


@dataclass
class Context:
    """What a part runs with: the command's arguments, the archive, a scratch folder, the machine's limits, and
    the search parts' data, made once for all of them."""
    args: argparse.Namespace
    archive: Archive
    work: Path
    machine: dict
    _search: tuple | None = field(default=None, repr=False)

    def search_data(self, make) -> tuple[np.ndarray, np.ndarray, str]:
        if self._search is None:
            self._search = make(self.args.cache, self.args.gallery, self.args.queries, self.args.dim)
        return self._search
