"""Compile, once after an install, the numba kernels that ANN libraries cache beside their own source.

PyNNDescent marks its kernels `cache=True`: numba compiles each on its first call (minutes on 2 cores) and keeps the
machine code in the library's __pycache__, where every later process finds it. A fresh environment has none, so the
first index built, in a run or in the test suite, would pay for all of them; this builds, reloads and searches a small
graph through imgret's own method, so that the install pays instead. Harmless to run again (it
then takes seconds); a library that is not installed is skipped.

    python tools/warm_jit.py
"""
from __future__ import annotations

import importlib.util
import sys
import time


def warm_pynndescent() -> str:
    """Build, save, load and search a small graph through imgret's own method, at conf/method/pynndescent.yaml's
    settings: the very calls (and so the very kernels and types) a run makes."""
    import tempfile
    from pathlib import Path

    import numpy as np
    from omegaconf import OmegaConf

    from imgret.index.methods import METHODS

    method = METHODS["pynndescent"]
    settings = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "method" / "pynndescent.yaml")
    opts = {key: settings[key] for key in method.build_params}
    # a low and a high dimension: PyNNDescent picks its trees' kernels by the rows' shape
    for (count, dim), threads in zip(((5000, 32), (1000, 1280)), (1, 2)):
        rows = np.random.default_rng(0).normal(size=(count, dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        native = method.build(opts, rows, threads)
        with tempfile.TemporaryDirectory() as folder:
            method.save(native, Path(folder) / "index")
            native = method.load(Path(folder) / "index", opts, {})
        for epsilon in (0.0, 0.1):
            method.results(method.bare(native, rows[:50], 10, {"epsilon": epsilon}, threads), 10)
    return f"pynndescent {method.library().__version__}"


def main() -> int:
    if importlib.util.find_spec("pynndescent") is None:
        print("warm_jit: pynndescent is not installed; nothing to compile")
        return 0
    start = time.perf_counter()
    warmed = warm_pynndescent()
    print(f"warm_jit: {warmed}'s numba kernels compiled and cached in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
