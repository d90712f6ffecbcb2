"""The precision part: per model, the forward in bf16-mixed against fp32, interleaved, and what it changes
(cosine of each image's two rows, recall@10 of the bf16 rows against the fp32 rows' exact neighbours)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from imgret.api import Embedder
from imgret.embed.models import build_encoder
from imgret.measure.timing import interleaved, spread
from imgret.bench.machine import Archive, Context, compose_cfg
from imgret.bench.extract import forward_only_images_per_s, real_images, rows_agreement


def cpu_flag(flag: str) -> bool | None:
    """Whether /proc/cpuinfo lists `flag` (None where there is no /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    return flag in cpuinfo.read_text().split() if cpuinfo.is_file() else None

def bench_precision(archive: Archive, work: Path, models: list[tuple[str, int, int]], batch_size: int,
                    rounds: int = 3) -> list[dict]:
    """bf16-mixed against fp32 for each model: forward-only throughput interleaved over `rounds`, then the rows
    each precision gives for the same images: their cosine, and recall@10 of bf16 search (the last tenth of the
    images as queries, the rest as gallery) against the fp32 rows' exact top 10."""
    rows = []
    for model, image_size, count in models:
        cfg = compose_cfg(f"model={model}", "model.pretrained=false", f"model.image_size={image_size}",
                          f"paths.cache={work / 'cache'}")
        images = real_images(archive, work / "cache", count)
        encoder = build_encoder(cfg.model, cfg.seed)
        fp32, bf16 = Embedder(encoder, "cpu", "32-true"), Embedder(encoder, "cpu", "bf16-mixed")
        batch = min(batch_size, count)
        batches = math.ceil(count / batch)
        print(f"  precision {model} {image_size}px: {rounds} rounds of fp32 / bf16-mixed forwards, {count} images each",
              flush=True)
        figures = interleaved({"fp32": lambda: forward_only_images_per_s(fp32, images, batch, batches),
                               "bf16": lambda: forward_only_images_per_s(bf16, images, batch, batches)}, rounds)
        ratios = [b / f for f, b in zip(figures["fp32"], figures["bf16"])]
        prepared = [fp32.prepare([images.open(i) for i in range(start, min(start + batch, count))])
                    for start in range(0, count, batch)]
        exact = np.concatenate([fp32.embed_prepared(ready) for ready in prepared])
        rounded = np.concatenate([bf16.embed_prepared(ready) for ready in prepared])
        agreement = rows_agreement(exact, rounded)
        rows.append({
            "model": model, "image_size": image_size, "images": count, "batch_size": batch, "rounds": rounds,
            "fp32_images_per_s_rounds": figures["fp32"], "bf16_images_per_s_rounds": figures["bf16"],
            "bf16_vs_fp32_rounds": ratios, "bf16_vs_fp32": spread(ratios)[0],
            "cosine_min": agreement["cosine_min"], "cosine_mean": agreement["cosine_mean"],
            "recall_at_10_vs_fp32": agreement["recall_at_10"], "queries": agreement["queries"],
            "cpu_has_avx512_bf16": cpu_flag("avx512_bf16"),
            "load_average": os.getloadavg(),
        })
    return rows


NEEDS_IMAGES = True


def run(ctx: Context) -> list[dict]:
    print("precision: bf16-mixed against fp32 forwards ...", flush=True)
    # bf16 without the CPU's BF16 instructions is emulated and several times slower: fewer images
    count = ctx.args.precision_images
    models = [("resnet18", 64, count), ("mobilenet", 64, count), ("clip", 224, max(8, count // 10))]
    return bench_precision(ctx.archive, ctx.work, models, ctx.args.batch_size, ctx.args.rounds)


def rows(result: list, row) -> None:
    for r in result:
        name = f"{r['model']} {r['image_size']}px, batch {r['batch_size']}"
        fp32, bf16, ratios = (spread(r[key]) for key in ("fp32_images_per_s_rounds", "bf16_images_per_s_rounds",
                                                          "bf16_vs_fp32_rounds"))
        row("precision", f"{name}: forward fp32, median of {r['rounds']} (min-max)",
            f"{fp32[0]:.0f} ({fp32[1]:.0f}-{fp32[2]:.0f}) img/s")
        row("precision", f"{name}: forward bf16-mixed, interleaved", f"{bf16[0]:.0f} ({bf16[1]:.0f}-{bf16[2]:.0f}) img/s",
            f"{r['bf16_vs_fp32']:.2f}x", f"ratios {ratios[1]:.2f}-{ratios[2]:.2f}, load {r['load_average'][0]:.2f}")
        row("precision", f"{name}: bf16 rows vs fp32: cosine min / mean",
            f"{r['cosine_min']:.4f} / {r['cosine_mean']:.4f}")
        row("precision", f"{name}: bf16 recall@10 vs fp32 neighbours ({r['queries']} queries)",
            f"{r['recall_at_10_vs_fp32']:.4f}")
