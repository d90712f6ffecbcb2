"""The ddp part: extraction throughput with 1 and with 2 processes (DDP, gloo on the CPU), interleaved and
repeated: the same real images, model and batch size."""
from __future__ import annotations

import os
import statistics
import uuid
from pathlib import Path

from imgret.embed.options import ExtractSettings
from imgret.embed.extract import extract_store
from imgret.embed.models import build_encoder, describe_encoder
from imgret.embed.store import store_key
from imgret.bench.machine import Archive, Context, compose_cfg
from imgret.bench.extract import real_images


def bench_ddp(archive: Archive, work: Path, count: int, batch_size: int, rounds: int = 2) -> dict:
    """1-process against 2-process extraction of the same `count` real images (resnet18, 64 px), in the order
    1, 2, 1, 2, ... so that a change in the machine's load falls on both. Throughput is the store's own
    figure: images over the seconds of Lightning's prediction loop (for 2 processes this includes waiting for
    rank 1 to start, as a run pays it)."""
    images = real_images(archive, work / "cache", count)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for attempt in range(rounds):
        for devices in (1, 2):
            cfg = compose_cfg("model.pretrained=false", "model.image_size=64", f"paths.cache={work / 'cache'}",
                              f"batch_size={batch_size}", "extract.progress=false", f"extract.devices={devices}",
                              f"extract.strategy={'ddp' if devices > 1 else 'auto'}", "extract.precision=32-true")
            settings = ExtractSettings.from_config(cfg)
            encoder = build_encoder(settings.model, settings.seed)
            key = store_key(images, describe_encoder(settings.model, settings.seed)) | {"bench": uuid.uuid4().hex}
            store = extract_store(encoder, images, key, settings, latency_ms=float("nan"))
            rates[devices].append(store.meta["extraction"]["images_per_s"])
            print(f"  ddp round {attempt + 1}: {devices} process(es): {rates[devices][-1]:.0f} img/s", flush=True)
    ratios = [two / one for one, two in zip(rates[1], rates[2])]
    return {"images": count, "batch_size": batch_size, "rounds": rounds, "one_process_images_per_s": rates[1],
            "two_processes_images_per_s": rates[2], "ratios": ratios,
            "load_average": os.getloadavg()}


NEEDS_IMAGES = True


def run(ctx: Context) -> dict:
    print(f"ddp: extracting {ctx.args.ddp_images:,} images with 1 and 2 processes ...", flush=True)
    return bench_ddp(ctx.archive, ctx.work, ctx.args.ddp_images, ctx.args.batch_size)


def rows(result: dict, row) -> None:
    d = result
    one, two, ratios = d["one_process_images_per_s"], d["two_processes_images_per_s"], d["ratios"]
    name = f"resnet18 64px, {d['images']:,} images, {d['rounds']} rounds interleaved"
    row("ddp", f"{name}: 1 process",
        f"{statistics.median(one):.0f} img/s ({min(one):.0f}-{max(one):.0f})")
    row("ddp", "  2 processes, DDP on gloo (median, min-max)",
        f"{statistics.median(two):.0f} img/s ({min(two):.0f}-{max(two):.0f})",
        f"{statistics.median(ratios):.2f}x", f"ratios {min(ratios):.2f}-{max(ratios):.2f}; "
        f"load {d['load_average'][0]:.2f}")
