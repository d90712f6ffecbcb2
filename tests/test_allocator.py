"""Extraction keeps the memory a forward frees (imgret.allocator): glibc's mmap/munmap of every large activation
no longer makes the kernel fault each batch's pages in again. Real models, real images, real processes; the
bounds are counts far from glibc's defaults (about 12,000 faults per image and a third of the CPU time in the
kernel for EfficientNet-Lite0 at 224 px), not timings."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PROJECT_ROOT, subset_zip
from imgret import allocator

pytestmark = pytest.mark.skipif(allocator.glibc() is None, reason="glibc's malloc is what this keeps from refaulting")


def test_the_block_nests_and_restores_glibc_s_settings():
    assert not allocator.keeping()
    with allocator.kept_freed_memory():
        with allocator.kept_freed_memory():
            assert allocator.keeping()
        assert allocator.keeping(), "the outer block still holds"
    assert not allocator.keeping()


BIG_ALLOCATIONS = """
import contextlib, ctypes, sys
from imgret import allocator
from imgret.rusage import CpuUse

libc = allocator.glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20  # larger than any mmap threshold
with allocator.kept_freed_memory() if sys.argv[1] == "kept" else contextlib.nullcontext():
    before = CpuUse.now()
    for _ in range(5):
        address = libc.malloc(size)
        ctypes.memset(address, 1, size)
        libc.free(address)
    print((CpuUse.now() - before).minor_faults)
"""


def big_allocations_fault(kept: bool) -> int:
    """Minor faults of allocating, touching and freeing 64 MB five times, in a fresh process: one that has run
    other work may hold a free block that large in its heap, which glibc would reuse whatever its settings."""
    done = subprocess.run([sys.executable, "-c", BIG_ALLOCATIONS, "kept" if kept else "defaults"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout.split()[-1])


def test_a_freed_large_buffer_is_reused_without_faulting_its_pages_in_again():
    pages = 64 * 2 ** 20 // 4096
    assert big_allocations_fault(kept=False) >= 4 * pages, "glibc maps and unmaps it: every round faults again"
    assert big_allocations_fault(kept=True) < 2 * pages, "kept: only the first round faults its pages in"


def test_not_a_single_row_changes(make_cfg):
    from imgret.api import Embedder
    from imgret.embed.models import build_encoder

    cfg = make_cfg("model=resnet18", "model.pretrained=false", "model.image_size=64")
    embedder = Embedder(build_encoder(cfg.model, cfg.seed), "cpu", "32-true")
    batch = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = embedder.embed_prepared(batch)
    with allocator.kept_freed_memory():
        kept = [embedder.embed_prepared(batch) for _ in range(2)]
    assert all(np.array_equal(plain, rows) for rows in kept)


@pytest.mark.slow  # the trained EfficientNet-Lite0 at 224 px over 264 real images, in a child process
def test_a_real_extraction_spends_little_of_its_cpu_time_in_the_kernel(tmp_path):
    # 17 batches of 16. The first batch faults its working set in for the first time, kept or not, and on a fresh
    # virtual machine that first touch costs the kernel far more per page than a re-fault: it grows with the batch
    # (a batch of 64 touches about four times the memory), so small batches keep this one-off cost from deciding a
    # test of what every later batch does. glibc's defaults at this batch size still re-fault every batch.
    archive, checksum = subset_zip(tmp_path / "tiny-subset.zip", 4, 64, 2)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    command = [sys.executable, "-m", "imgret.run", f"data.archive={archive}", f"data.checksums=[{checksum}]",
               f"paths.cache={tmp_path / 'cache'}", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}",
               "model=efficientnet_lite0", "method=flat", "extract.progress=false", "extract.latency_images=2",
               "extract.precision=32-true", "extract.backend=torch", "search.latency_queries=5",
               "search.warmup_queries=1", "threads=1", "batch_size=16"]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "run").rglob("results.json")).read_text())
    metrics = results.get("metrics", results)
    # glibc's defaults: about a third of the CPU time in the kernel and 12,000 faults an image
    assert metrics["extract_kernel_share"] < 0.15, metrics
    assert metrics["extract_minor_faults_per_image"] < 3000, metrics
