"""The extract part: per model, imgret's extraction throughput (Lightning loop, data loading included) against
the model's forward alone between its batches and against extraction with the reference decoder (pil),
interleaved; how much the decoder changes the rows; the seed's one-image-at-a-time loop; FLOPs against the
matmul peak."""
from __future__ import annotations

import dataclasses

import math
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from imgret.allocator import kept_freed_memory
from imgret.api import Embedder
from imgret.embed.options import ExtractSettings
from imgret.embed.extract import extract_store
from imgret.embed.models import build_encoder, describe_encoder
from imgret.embed.store import store_key
from imgret.measure.metrics import recall_at
from imgret.measure.timing import interleaved, spread
from imgret.rusage import CpuUse
from imgret.sources.base import ImageSet, stratified_subset
from imgret.sources.registry import load_splits
from imgret.bench.machine import Archive, Context, compose_cfg
from imgret.bench.verdicts import verdict


def real_images(archive: Archive, cache: Path, count: int) -> ImageSet:
    checksums = [f"data.checksums=[{archive.checksum}]"] if archive.checksum else []
    cfg = compose_cfg(f"data.archive={archive.path}", f"paths.cache={cache}", *checksums)
    gallery = load_splits(cfg.data).gallery
    subset = stratified_subset(gallery, max(1, math.ceil(count / len(gallery.class_names))))
    return ImageSet(subset.dataset, subset.split, subset.paths[:count], subset.labels[:count],
                    subset.class_names, subset.source_id)

def forward_only_images_per_s(embedder: Embedder, ready: torch.Tensor, seconds: float,
                              rows: list | None = None) -> tuple[float, float, float]:
    """The model alone: extraction's module, memory format and precision (an `Embedder` of the same config) on a
    batch already in memory (`Embedder.prepare`), its freed memory kept as extraction keeps it; one or two untimed
    calls first (one where a call takes more than a quarter of `seconds`), then calls until `seconds` have passed
    (at least one). (images/s, the kernel's share of their CPU time, minor page faults per image); `rows`: the
    rows of the last call are appended to it."""
    with kept_freed_memory():
        start = time.perf_counter()
        embedder.embed_prepared(ready)
        if time.perf_counter() - start < seconds / 4:
            embedder.embed_prepared(ready)
        calls, start, used = 0, time.perf_counter(), CpuUse.now()
        while calls == 0 or time.perf_counter() - start < seconds:
            found = embedder.embed_prepared(ready)
            calls += 1
        elapsed, used = time.perf_counter() - start, CpuUse.now() - used
    if rows is not None:
        rows.append(found)
    return calls * len(ready) / elapsed, used.kernel_share, used.minor_faults / (calls * len(ready))

def seed_loop_images_per_s(encoder, image_set: ImageSet, count: int) -> float:
    """The seed's loop: open one image, preprocess it, run the model on it alone, next image."""
    network = encoder.network.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        network(encoder.transform(Image.open(image_set.paths[0]).convert("RGB")).unsqueeze(0))
        start = time.perf_counter()
        for path in image_set.paths[:count]:
            network(encoder.transform(Image.open(path).convert("RGB")).unsqueeze(0))
    return count / (time.perf_counter() - start)

def flops_per_image(encoder, image_size: int) -> float:
    """FLOPs of one forward. nn.MultiheadAttention's inference fast path is one fused op the counter does not
    see (it would miss a third of ViT-B/32's FLOPs), so it is counted with the fast path off: the same matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, torch.inference_mode():
            encoder.network(torch.randn(1, 3, image_size, image_size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return float(counter.get_total_flops())

def rows_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How much other rows of the same images change retrieval: each image's cosine between its two rows, and
    recall@10 of exact search over the candidate rows (the last tenth as queries, the rest as gallery) against
    the reference rows' exact top 10."""
    cosines = np.sum(reference * candidate, axis=1)
    queries = max(1, len(reference) // 10)
    depth = min(10, len(reference) - queries)
    truth = np.argsort(-(reference[-queries:] @ reference[:-queries].T), axis=1)[:, :depth]
    found = np.argsort(-(candidate[-queries:] @ candidate[:-queries].T), axis=1)[:, :depth]
    return {"cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean()),
            "recall_at_10": recall_at(found, truth, depth), "queries": queries}

class ForwardBetweenBatches(pl.Callback):
    """After each batch of an extraction, the model's forward alone on a ready batch of the same size, timed. The
    two alternate batch by batch (a fraction of a second each), so a machine whose speed drifts, as a shared one
    does by 10% within seconds, slows both alike; the extraction's own time is the loop's minus these."""

    def __init__(self, embedder: Embedder, ready: torch.Tensor, warmup: int = 2):
        self.embedder, self.ready, self.warmup = embedder, ready, warmup
        self.seconds: list[float] = []
        self.warmup_seconds = 0.0
        self.used = CpuUse(0.0, 0.0, 0)  # these forwards' CPU use, warm-ups included: not the extraction's own

    def on_predict_start(self, trainer, pl_module):
        for _ in range(self.warmup):  # inside the extraction's time too: subtracted, not counted
            self.warmup_seconds += self._forward()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seconds.append(self._forward())

    def _forward(self) -> float:
        start, used = time.perf_counter(), CpuUse.now()
        self.embedder.embed_prepared(self.ready)
        self.used = self.used + (CpuUse.now() - used)
        return time.perf_counter() - start

    @property
    def images_per_s(self) -> float:
        return len(self.seconds) * len(self.ready) / sum(self.seconds)

class ExtractionRounds:
    """One model's extractions end to end, each with the model's forward alone on ready tensors after every batch
    (`ForwardBetweenBatches`): the rates, the CPU use and the last rows of each decoder."""

    def __init__(self, settings: ExtractSettings, images: ImageSet):
        self.settings, self.images = settings, images
        self.encoder = build_encoder(settings.model, settings.seed)
        # the very module, memory format and precision extraction runs
        self.embedder = Embedder.from_settings(settings, self.encoder)
        self.ready = self.embedder.prepare([images.open(i % len(images)) for i in range(settings.batch_size)])
        self.decoder = self.embedder.preprocessing.decoder
        self.last_rows: dict[str, np.ndarray] = {}
        self.forward_rates: dict[str, list[float]] = {self.decoder: [], "pil": []}
        self.own_use: dict[str, list] = {self.decoder: [], "pil": []}

    def __call__(self, decoder: str) -> float:
        """Extraction's images/s with `decoder`; the forward's images/s between its batches go to `forward_rates`."""
        settings, images = self.settings, self.images
        key = store_key(images, describe_encoder(settings.model, settings.seed)) | {"bench": uuid.uuid4().hex}
        forward = ForwardBetweenBatches(self.embedder, self.ready)
        store = extract_store(self.encoder, images, key, dataclasses.replace(settings, decoder=decoder), float("nan"),
                              [forward])
        seconds = store.meta["extraction"]["seconds"] - sum(forward.seconds) - forward.warmup_seconds
        self.forward_rates[decoder].append(forward.images_per_s)
        self.own_use[decoder].append(CpuUse.of_records([store.meta["extraction"]]) - forward.used)
        self.last_rows[decoder] = np.array(store.vectors)
        shutil.rmtree(store.path, ignore_errors=True)  # each round's store is new (its own key); none is reused
        return len(images) / seconds


def bench_extract(archive: Archive, work: Path, peak: float, models: list[tuple[str, int, int]],
                  batch_size: int, num_workers: int, channels_last: bool, rounds: int = 3) -> list[dict]:
    """Per model, `rounds` rounds of: imgret's extraction end to end (its default decoder), then end to end with
    the reference decoder (`pil`, each model's own transform); in each, the model's forward alone on ready
    tensors after every batch (`ForwardBetweenBatches`). Each round's ratios, then their median and spread. Then
    how much the default decoder's rows differ from the reference's, and the seed's one-image loop, for scale."""
    rows = []
    for model, image_size, count in models:
        cfg = compose_cfg(f"model={model}", "model.pretrained=false", f"model.image_size={image_size}",
                          f"paths.cache={work / 'cache'}", f"batch_size={batch_size}",
                          f"num_workers={num_workers}", f"extract.channels_last={channels_last}",
                          # fp32, as the matmul peak it is measured against: the precision part measures the others
                          "extract.precision=32-true", "extract.progress=false")
        runs = ExtractionRounds(ExtractSettings.from_config(cfg), real_images(archive, work / "cache", count))
        decoder = runs.decoder
        print(f"  extract {model} {image_size}px: {rounds} rounds of end to end ({decoder} decoder), end to end (pil "
              f"decoder), each with the forward alone between its batches; {count} images each", flush=True)
        figures = interleaved({"end_to_end": lambda: runs(decoder), "pil": lambda: runs("pil")}, rounds)
        extraction, forward, pil = figures["end_to_end"], runs.forward_rates[decoder], figures["pil"]
        ratios = [e2e / alone for e2e, alone in zip(extraction, forward)]
        pil_ratios = [e2e / alone for e2e, alone in zip(pil, runs.forward_rates["pil"])]
        decoder_gains = [mine / theirs for mine, theirs in zip(ratios, pil_ratios)]  # each against its own forward
        pipeline, alone = spread(extraction)[0], spread(forward)[0]
        seed = seed_loop_images_per_s(runs.encoder, runs.images, max(16, count // 16))
        flops = flops_per_image(runs.encoder, image_size)
        agreement = rows_agreement(runs.last_rows["pil"], runs.last_rows[decoder])
        rows.append({
            "model": model, "image_size": image_size, "images": count, "batch_size": batch_size,
            "num_workers": num_workers, "channels_last": channels_last, "precision": runs.embedder.precision,
            "decoder": decoder, "rounds": rounds, "imgret_images_per_s_rounds": extraction,
            "forward_only_images_per_s_rounds": forward, "extract_vs_forward_rounds": ratios,
            "pil_decoder_images_per_s_rounds": pil, "pil_decoder_vs_forward_rounds": pil_ratios,
            "decoder_vs_pil_rounds": decoder_gains, "decoder_vs_pil": spread(decoder_gains)[0],
            "decoder_vs_pil_cosine_min": agreement["cosine_min"], "decoder_vs_pil_cosine_mean": agreement["cosine_mean"],
            "decoder_vs_pil_recall_at_10": agreement["recall_at_10"], "decoder_vs_pil_queries": agreement["queries"],
            "imgret_images_per_s": pipeline, "forward_only_images_per_s": alone,
            # the extraction's own CPU use (its workers' included, the interleaved forwards' taken out)
            "kernel_share_rounds": [used.kernel_share for used in runs.own_use[decoder]],
            "minor_faults_per_image_rounds": [used.minor_faults / count for used in runs.own_use[decoder]],
            "seed_loop_images_per_s": seed, "gflops_per_image": flops / 1e9,
            "achieved_gflops": pipeline * flops / 1e9, "forward_gflops": alone * flops / 1e9,
            "matmul_peak_gflops": peak, "extract_vs_forward": spread(ratios)[0], "extract_vs_seed_loop": pipeline / seed,
            "extract_vs_matmul_peak": pipeline * flops / 1e9 / peak, "forward_vs_matmul_peak": alone * flops / 1e9 / peak,
            "load_average": os.getloadavg(),
        })
    return rows


NEEDS_IMAGES = True


def run(ctx: Context) -> list[dict]:
    args = ctx.args
    print("extract: resnet18, mobilenet at 64 px; clip at 224 px ...", flush=True)
    models = [("resnet18", 64, args.images), ("mobilenet", 64, args.images), ("clip", 224, args.clip_images)]
    return bench_extract(ctx.archive, ctx.work, ctx.machine["matmul_peak_gflops"], models, args.batch_size,
                         args.num_workers, not args.no_channels_last, args.rounds)


def rows(result: list, row) -> None:
    for r in result:
        name = f"{r['model']} {r['image_size']}px, batch {r['batch_size']}"
        rounds = r.get("rounds", 1)
        e2e, forward, ratios = (spread(r.get(f"{key}_rounds", [r[key]])) for key in
                                ("imgret_images_per_s", "forward_only_images_per_s", "extract_vs_forward"))
        row("extract", f"{name}: imgret end to end, median of {rounds} (min-max)",
            f"{e2e[0]:.0f} ({e2e[1]:.0f}-{e2e[2]:.0f}) img/s")
        if "kernel_share_rounds" in r:
            share, faults = spread(r["kernel_share_rounds"]), spread(r["minor_faults_per_image_rounds"])
            row("extract", f"{name}: end to end, kernel share; minor faults per image",
                f"{share[0]:.2f} ({share[1]:.2f}-{share[2]:.2f})", f"{faults[0]:,.0f}",
                f"faults {faults[1]:,.0f}-{faults[2]:,.0f}")
        row("extract", f"{name}: forward only, interleaved with it",
            f"{forward[0]:.0f} ({forward[1]:.0f}-{forward[2]:.0f}) img/s",
            f"{r['extract_vs_forward']:.3f}x", verdict("extract_vs_forward", r["extract_vs_forward"], ratios[1:]) +
            f"; ratios {ratios[1]:.3f}-{ratios[2]:.3f}, load {r.get('load_average', [float('nan')])[0]:.2f}")
        if "pil_decoder_images_per_s_rounds" in r:
            pil, gains = spread(r["pil_decoder_images_per_s_rounds"]), spread(r["decoder_vs_pil_rounds"])
            row("extract", f"{name}: end to end, pil decoder (the reference), interleaved",
                f"{pil[0]:.0f} ({pil[1]:.0f}-{pil[2]:.0f}) img/s", f"{r['decoder_vs_pil']:.2f}x",
                f"{r['decoder']} decoder's speed-up; ratios {gains[1]:.2f}-{gains[2]:.2f}")
            row("extract", f"{name}: {r['decoder']} vs pil rows: cosine min / mean",
                f"{r['decoder_vs_pil_cosine_min']:.4f} / {r['decoder_vs_pil_cosine_mean']:.4f}")
            row("extract", f"{name}: {r['decoder']} recall@10 vs pil neighbours ({r['decoder_vs_pil_queries']} q.)",
                f"{r['decoder_vs_pil_recall_at_10']:.4f}")
        seed_target = verdict("extract_vs_seed_loop_64px", r["extract_vs_seed_loop"]) if r["image_size"] == 64 else ""
        row("extract", f"{name}: seed loop (one image at a time)", f"{r['seed_loop_images_per_s']:.0f} img/s",
            f"{r['extract_vs_seed_loop']:.2f}x", seed_target)
        peak_target = verdict("clip_extract_vs_matmul_peak", r["extract_vs_matmul_peak"]) \
            if r["model"] == "clip" and r["image_size"] == 224 else ""
        if "forward_vs_matmul_peak" in r:
            peak_target += f"{'; ' if peak_target else ''}forward only {r['forward_gflops']:.0f} GFLOP/s, " \
                           f"{r['forward_vs_matmul_peak']:.2f}x"
        row("extract", f"{name}: achieved ({r['gflops_per_image']:.2f} GFLOP/img) vs peak",
            f"{r['achieved_gflops']:.0f} GFLOP/s", f"{r['extract_vs_matmul_peak']:.2f}x", peak_target)
