"""The allocator part: where a model's forward spends its CPU time under each way of keeping its freed memory, each
in a fresh process (an allocator's settings hold for a whole process), interleaved over rounds: glibc's defaults;
its tunables set before the interpreter starts; `imgret.allocator.kept_freed_memory` (what extraction runs); and
glibc's defaults at a batch small enough that every activation stays under the mmap threshold. Per alternative:
images/s, the kernel's share of the CPU time, minor page faults per image, and whether every row is the same
(bit for bit: another batch size or backend may differ in the last bits); and imgret's default path as it is now
(memory kept, extract.backend=auto), each against glibc's defaults, the default path before it."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time

from imgret.bench.machine import Archive, Context
from imgret.measure.timing import spread

# name -> (environment added, whether the probe enters kept_freed_memory, batch size or None for the part's)
TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
ALTERNATIVES = {
    "glibc defaults": ({}, False, None),
    "GLIBC_TUNABLES before start": ({"GLIBC_TUNABLES": TUNABLES}, False, None),
    "kept_freed_memory (imgret)": ({}, True, None),
    "glibc defaults, batch 8": ({}, False, 8),
    # what extraction runs now: its memory kept, and extract.backend=auto's choice on these images
    "imgret's default (auto backend)": ({}, True, None),
}
DEFAULT_PATH = "imgret's default (auto backend)"


def probe(spec: dict) -> dict:
    """In a fresh process: the trained EfficientNet-Lite0's forward (imgret's Embedder, fp32) on one batch of real
    images, warmed up twice, then repeated for `seconds`; CPU use of that time from getrusage."""
    import torch

    from imgret.allocator import kept_freed_memory
    from imgret.api import Embedder
    from imgret.bench.extract import real_images
    from imgret.bench.machine import compose_cfg
    from imgret.embed.models import build_encoder
    from imgret.embed.options import ExtractSettings
    from imgret.rusage import CpuUse
    from pathlib import Path

    torch.set_num_threads(spec["threads"])
    cfg = compose_cfg("model=efficientnet_lite0", f"paths.cache={spec['cache']}", "extract.precision=32-true")
    images = real_images(Archive(Path(spec["archive"]), spec["checksum"]), Path(spec["cache"]), spec["batch_size"])
    encoder = build_encoder(cfg.model, cfg.seed)
    if spec["name"] == DEFAULT_PATH:  # the backend auto chooses on these images (compared once, cached)
        embedder = Embedder.from_settings(ExtractSettings.from_config(cfg), encoder, gallery=images)
    else:
        embedder = Embedder(encoder, "cpu", "32-true")
    ready = embedder.prepare([images.open(i % len(images)) for i in range(spec["batch_size"])])
    with kept_freed_memory() if spec["kept"] else contextlib.nullcontext():
        for _ in range(2):  # the first call faults its working set in, the second lets the heap settle its layout
            rows = embedder.embed_prepared(ready)
        used, start, batches = CpuUse.now(), time.perf_counter(), 0
        while batches == 0 or time.perf_counter() - start < spec["seconds"]:
            rows = embedder.embed_prepared(ready)
            batches += 1
        seconds, used = time.perf_counter() - start, CpuUse.now() - used
    count = batches * spec["batch_size"]
    return {"images_per_s": count / seconds, "kernel_share": used.kernel_share,
            "backend": "torch" if embedder.forward is None else "openvino",
            "minor_faults_per_image": used.minor_faults / count, "batches": batches,
            "rows_sha256": hashlib.sha256(rows[:8].tobytes()).hexdigest()}


def bench_allocator(archive: Archive, cache: str, batch_size: int, threads: int, rounds: int,
                    seconds: float) -> dict:
    figures: dict[str, list[dict]] = {name: [] for name in ALTERNATIVES}
    names = list(ALTERNATIVES)
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            extra, kept, batch = ALTERNATIVES[name]
            spec = {"name": name, "threads": threads, "cache": cache, "archive": str(archive.path),
                    "checksum": archive.checksum,
                    "batch_size": batch or batch_size, "kept": kept, "seconds": seconds}
            code = f"import json; from imgret.bench.allocator import probe; print(json.dumps(probe({spec!r})))"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, **extra})
            if done.returncode != 0:
                raise RuntimeError(f"the allocator probe '{name}' failed: {done.stderr.strip()[-2000:]}")
            figures[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  allocator round {round_ + 1}/{rounds}, {name}: "
                  f"{figures[name][-1]['images_per_s']:.1f} images/s", flush=True)
    reference = figures[names[0]][0]["rows_sha256"]
    return {"batch_size": batch_size, "threads": threads, "rounds": rounds, "seconds_per_probe": seconds,
            "load_average": os.getloadavg(), "alternatives": {
                name: {"images_per_s_rounds": [f["images_per_s"] for f in found],
                       "kernel_share_rounds": [f["kernel_share"] for f in found],
                       "minor_faults_per_image_rounds": [f["minor_faults_per_image"] for f in found],
                       "same_rows_as_defaults": all(f["rows_sha256"] == reference for f in found),
                       "backend": found[0]["backend"],
                       "vs_glibc_defaults_rounds": [f["images_per_s"] / d["images_per_s"]
                                                    for f, d in zip(found, figures[names[0]])],
                       "batch_size": ALTERNATIVES[name][2] or batch_size}
                for name, found in figures.items()}}


NEEDS_IMAGES = True


def run(ctx: Context) -> dict:
    print("allocator: the trained EfficientNet-Lite0's forward at 224 px under each way of keeping freed memory, "
          "each in a fresh process ...", flush=True)
    return bench_allocator(ctx.archive, str(ctx.work / "cache"), ctx.args.batch_size,
                           ctx.args.threads or os.cpu_count() or 1, ctx.args.rounds, ctx.args.allocator_seconds)


def rows(result: dict | None, row) -> None:
    if not result:
        return
    for name, found in result["alternatives"].items():
        rate, share = spread(found["images_per_s_rounds"]), spread(found["kernel_share_rounds"])
        faults = spread(found["minor_faults_per_image_rounds"])
        ratio = spread(found["vs_glibc_defaults_rounds"])
        row("allocator", f"{name}, batch {found['batch_size']}: img/s, median of {result['rounds']}",
            f"{rate[0]:.1f} ({rate[1]:.1f}-{rate[2]:.1f})", f"{ratio[0]:.2f}x",
            f"vs glibc defaults, ratios {ratio[1]:.2f}-{ratio[2]:.2f}; {found['backend']}; load "
            f"{result['load_average'][0]:.2f}; rows {'the same' if found['same_rows_as_defaults'] else 'differ'}")
        row("allocator", f"{name}: kernel share; minor faults per image",
            f"{share[0]:.2f} ({share[1]:.2f}-{share[2]:.2f})", f"{faults[0]:,.0f}",
            f"faults {faults[1]:,.0f}-{faults[2]:,.0f}")
