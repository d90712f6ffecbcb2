"""The memory part: peak resident set of extracting a small and a full gallery, each in a fresh process,
sampled from outside (the process's own high-water mark and the process tree's)."""
from __future__ import annotations

import multiprocessing
import time
import uuid
from pathlib import Path

from imgret.embed.options import ExtractSettings
from imgret.embed.extract import extract_store
from imgret.embed.models import build_encoder, describe_encoder
from imgret.embed.store import store_key
from imgret.bench.machine import Archive, Context, compose_cfg
from imgret.bench.verdicts import verdict
from imgret.bench.extract import real_images


def _extract_in_child(archive: Archive, cache: str, count: int, num_workers: str, result_queue) -> None:
    work = Path(cache)
    cfg = compose_cfg("model=resnet18", "model.pretrained=false", "model.image_size=64", f"paths.cache={work}",
                      "extract.progress=false", f"num_workers={num_workers}")
    images = real_images(archive, work, count)
    settings = ExtractSettings.from_config(cfg)
    encoder = build_encoder(settings.model, settings.seed)
    key = store_key(images, describe_encoder(settings.model, settings.seed)) | {"bench": uuid.uuid4().hex}
    start = time.perf_counter()
    store = extract_store(encoder, images, key, settings, latency_ms=float("nan"))
    seconds = time.perf_counter() - start
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child would
    # report its parent's footprint (the benchmark's, holding a 100k gallery) as its own.
    high_water = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmHWM:"))
    result_queue.put({"images": len(store), "seconds": seconds, "main_peak_rss_gb": high_water / 1024 ** 2})

def _process_tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of a process and its descendants (data-loader workers). PSS splits shared pages
    between their sharers, so a forked worker's copy-on-write pages are not counted twice as in RSS."""
    rss = pss = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss, pss

def bench_memory(archive: Archive, work: Path, sizes: list[int], num_workers: str) -> list[dict]:
    """Each size in a fresh process, so each peak is its own, sampled from outside every 0.2 s."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for count in sizes:
        queue = context.Queue()
        child = context.Process(target=_extract_in_child,
                                args=(archive, str(work / "cache"), count, num_workers, queue))
        child.start()
        peak_rss = peak_pss = 0
        while child.is_alive() and queue.empty():
            rss, pss = _process_tree_memory(child.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.1)
        result = queue.get()
        child.join()
        # the tree's sampled RSS can miss a short spike; the main process's own high-water mark cannot
        peak = max(peak_rss / 1024 ** 3, result["main_peak_rss_gb"])
        rows.append({**result, "peak_rss_gb": peak, "peak_pss_gb": peak_pss / 1024 ** 3})
    return rows


NEEDS_IMAGES = True


def run(ctx: Context) -> list[dict]:
    sizes = [int(s) for s in ctx.args.memory_sizes.split(",")]
    print(f"memory: extracting {', '.join(f'{s:,}' for s in sizes)} images in fresh processes ...", flush=True)
    return bench_memory(ctx.archive, ctx.work, sizes, ctx.args.num_workers)


def rows(result: list, row) -> None:
    for m in result:
        row("memory", f"extract {m['images']:,} images: peak RSS (main + loader processes)",
            f"{m['peak_rss_gb']:.2f} GB", "", verdict("extract_peak_rss_gb", m["peak_rss_gb"]))
        row("memory", "  peak PSS of the process tree (shared pages counted once)", f"{m['peak_pss_gb']:.2f} GB")
    if len(result) > 1:
        small, large = result[0], result[-1]
        row("memory", f"growth from {small['images']:,} to {large['images']:,} images",
            f"{large['peak_rss_gb'] - small['peak_rss_gb']:+.2f} GB", f"{large['peak_rss_gb'] / small['peak_rss_gb']:.2f}x")
