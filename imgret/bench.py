"""`python -m imgret.bench`: imgret's speed against this machine's limits and the obvious alternatives,
measured side by side in one process. Prints a table of figures and ratios and writes them as JSON.

Parts (choose with --parts):
  extract  per model: imgret's extraction throughput (Lightning loop, data loading included) against the
           model's forward alone on ready tensors and against extraction with the reference decoder (pil),
           interleaved; how much the decoder changes the rows (cosine, recall@10 against the pil rows'
           neighbours); the seed's one-image-at-a-time loop, and the matmul peak
  precision  per model: the forward in bf16-mixed (autocast; AVX512-BF16 where the CPU has it) against fp32,
           interleaved, and what it changes: cosine of each image's two rows, recall@10 of bf16 rows against the
           fp32 rows' exact neighbours
  search   exact search over a 100,000 x 512 gallery: imgret's brute force against the matmul limit and
           faiss.IndexFlatIP; single-query latency against the memory-bandwidth limit (reading the gallery
           once), in alternating blocks
  ivf      the search time imgret reports against a bare faiss call on the same index and queries
  memory   peak RSS of extracting a small and a full gallery (streamed writes: it must not grow)
  ddp      extraction throughput with 1 and with 2 processes (DDP, gloo on the CPU), interleaved and repeated:
           the same real images, model and batch size; each process gets its share of the cores
  verify   what trusting the cache costs: opening (checksum-verifying) a committed store of the search part's
           gallery size, against reading its bytes once
  scale    a 1.28M x 512 synthetic gallery (imgret's store, memory-mapped): time and peak resident set of the exact
           ground truth, the IVF build, IVF search and streamed brute force, each in a fresh process, against
           the gallery's own bytes
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import psutil
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from imgret.sources.base import ImageSet, stratified_subset
from imgret.sources.registry import load_splits
from imgret.api import Embedder
from imgret.embed.extract import extract_store
from imgret.index.build import build_index
from imgret.index.methods import BruteForceIndex
from imgret.embed.models import build_encoder, describe_encoder
from imgret.measure.metrics import recall_at
from imgret.measure.search import timed_search
from imgret.measure.timing import interleaved, spread
from imgret.embed.store import EmbeddingStore, StagedStore, store_key

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = PROJECT_ROOT.parent / "shared" / "data" / "tiny-imagenet-200.zip"
PARTS = ("extract", "precision", "search", "ivf", "memory", "ddp", "verify", "scale")
TARGETS = {  # the targets: (comparison, bound)
    "extract_vs_forward": (">=", 0.95),
    "extract_vs_seed_loop_64px": (">=", 3.0),
    "clip_extract_vs_matmul_peak": (">=", 0.6),
    "brute_vs_matmul_peak": (">=", 0.5),
    "brute_vs_faiss_flat": (">=", 3.0),
    "single_query_vs_bandwidth_limit": ("<=", 1.3),
    "ivf_harness_overhead": ("<=", 0.05),
    "extract_peak_rss_gb": ("<=", 3.0),
}


def compose_cfg(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("imgret.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# --------------------------------------------------------------------------- machine limits


def matmul_peak_gflops(seconds: float = 4.0) -> dict[str, float]:
    """Best fp32 GEMM rate over square products, through torch (MKL) and numpy (OpenBLAS): the machine's
    peak is the better of the two, so a ratio against it cannot flatter whichever one imgret uses."""
    rates = {}
    for library, make in (("torch", torch.randn), ("numpy", lambda *shape: np.random.rand(*shape).astype(np.float32))):
        best = 0.0
        for n in (2048, 4096):
            a, b = make(n, n), make(n, n)
            a @ b
            deadline = time.perf_counter() + seconds / 4
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
        rates[library] = best
    return rates


def memory_bandwidth_gbs(megabytes: int = 1024, repeats: int = 8) -> float:
    """Read bandwidth: the best rate of summing a buffer far larger than every cache."""
    buffer = torch.ones(megabytes * 1024 * 1024 // 4)
    buffer.sum()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = max(best, buffer.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Archive:
    """The Tiny-ImageNet zip the image parts read, and its sha256 when it is not the official one (a subset)."""
    path: Path
    checksum: str | None = None


def real_images(archive: Archive, cache: Path, count: int) -> ImageSet:
    checksums = [f"data.checksums=[{archive.checksum}]"] if archive.checksum else []
    cfg = compose_cfg(f"data.archive={archive.path}", f"paths.cache={cache}", *checksums)
    gallery = load_splits(cfg.data).gallery
    subset = stratified_subset(gallery, max(1, math.ceil(count / len(gallery.class_names))))
    return ImageSet(subset.dataset, subset.split, subset.paths[:count], subset.labels[:count],
                    subset.class_names, subset.source_id)


def forward_only_images_per_s(embedder: Embedder, image_set: ImageSet, batch_size: int, batches: int) -> float:
    """The model alone: extraction's module, memory format and precision (an `Embedder` of the same config), the
    same batch size, tensors ready in memory; two untimed batches first."""
    ready = embedder.prepare([image_set.open(i % len(image_set)) for i in range(batch_size)])
    for _ in range(2):
        embedder.embed_prepared(ready)
    start = time.perf_counter()
    for _ in range(batches):
        embedder.embed_prepared(ready)
    return batches * batch_size / (time.perf_counter() - start)


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

    def on_predict_start(self, trainer, pl_module):
        for _ in range(self.warmup):  # inside the extraction's time too: subtracted, not counted
            self.warmup_seconds += self._forward()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seconds.append(self._forward())

    def _forward(self) -> float:
        start = time.perf_counter()
        self.embedder.embed_prepared(self.ready)
        return time.perf_counter() - start

    @property
    def images_per_s(self) -> float:
        return len(self.seconds) * len(self.ready) / sum(self.seconds)


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
                          "extract.progress=false")
        images = real_images(archive, work / "cache", count)
        encoder = build_encoder(cfg.model, cfg.seed)
        embedder = Embedder.from_config(cfg, encoder)  # the very module, memory format and precision extraction runs
        ready = embedder.prepare([images.open(i % len(images)) for i in range(batch_size)])
        decoder = embedder.preprocessing.decoder
        last_rows, forward_rates = {}, {decoder: [], "pil": []}

        def end_to_end(decoder: str) -> float:
            """Extraction's images/s; the forward's images/s between its batches go to `forward_rates`."""
            run_cfg = OmegaConf.merge(cfg, {"extract": {"decoder": decoder}})
            key = store_key(images, describe_encoder(cfg.model, cfg.seed)) | {"bench": uuid.uuid4().hex}
            forward = ForwardBetweenBatches(embedder, ready)
            store = extract_store(encoder, images, key, work / "cache", run_cfg, float("nan"), [forward])
            seconds = store.meta["extraction"]["seconds"] - sum(forward.seconds) - forward.warmup_seconds
            forward_rates[decoder].append(forward.images_per_s)
            last_rows[decoder] = np.array(store.vectors)
            shutil.rmtree(store.path, ignore_errors=True)  # each round's store is new (its own key); none is reused
            return count / seconds

        print(f"  extract {model} {image_size}px: {rounds} rounds of end to end ({decoder} decoder), end to end (pil "
              f"decoder), each with the forward alone between its batches; {count} images each", flush=True)
        figures = interleaved({"end_to_end": lambda: end_to_end(decoder), "pil": lambda: end_to_end("pil")}, rounds)
        extraction, forward, pil = figures["end_to_end"], forward_rates[decoder], figures["pil"]
        ratios = [e2e / alone for e2e, alone in zip(extraction, forward)]
        pil_ratios = [e2e / alone for e2e, alone in zip(pil, forward_rates["pil"])]
        decoder_gains = [mine / theirs for mine, theirs in zip(ratios, pil_ratios)]  # each against its own forward
        pipeline, alone = spread(extraction)[0], spread(forward)[0]
        seed = seed_loop_images_per_s(encoder, images, max(16, count // 16))
        flops = flops_per_image(encoder, image_size)
        agreement = rows_agreement(last_rows["pil"], last_rows[decoder])
        rows.append({
            "model": model, "image_size": image_size, "images": count, "batch_size": batch_size,
            "num_workers": num_workers, "channels_last": channels_last, "precision": embedder.precision,
            "decoder": decoder, "rounds": rounds, "imgret_images_per_s_rounds": extraction,
            "forward_only_images_per_s_rounds": forward, "extract_vs_forward_rounds": ratios,
            "pil_decoder_images_per_s_rounds": pil, "pil_decoder_vs_forward_rounds": pil_ratios,
            "decoder_vs_pil_rounds": decoder_gains, "decoder_vs_pil": spread(decoder_gains)[0],
            "decoder_vs_pil_cosine_min": agreement["cosine_min"], "decoder_vs_pil_cosine_mean": agreement["cosine_mean"],
            "decoder_vs_pil_recall_at_10": agreement["recall_at_10"], "decoder_vs_pil_queries": agreement["queries"],
            "imgret_images_per_s": pipeline, "forward_only_images_per_s": alone,
            "seed_loop_images_per_s": seed, "gflops_per_image": flops / 1e9,
            "achieved_gflops": pipeline * flops / 1e9, "forward_gflops": alone * flops / 1e9,
            "matmul_peak_gflops": peak, "extract_vs_forward": spread(ratios)[0], "extract_vs_seed_loop": pipeline / seed,
            "extract_vs_matmul_peak": pipeline * flops / 1e9 / peak, "forward_vs_matmul_peak": alone * flops / 1e9 / peak,
            "load_average": os.getloadavg(),
        })
    return rows


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


# --------------------------------------------------------------------------- search


def store_label(key: dict) -> str:
    """What a store's vectors are, from its key: extracted embeddings of a model with its weights, or vectors
    that no model made (generated, or read from files)."""
    encoder = key.get("encoder", {})
    if "weights" in encoder:
        return (f"embeddings of {key['dataset']} images by {encoder['name']} ({encoder['arch']}, weights "
                f"{encoder['weights']}, {encoder['image_size']} px)")
    if "generator" in key:
        return f"synthetic vectors (data={key['dataset']}, seed {key['generator'].get('seed')}), no model"
    return f"vectors read from files (data={key['dataset']}), no model"


def search_data(cache: Path, gallery_size: int, query_count: int, dim: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Real cached embeddings of the right shape when present, else clustered random vectors."""
    root = cache / "embeddings"
    # committed stores only: not locks, staging folders or what was moved aside (opening those would move them)
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
               and (p / "meta.json").is_file()] if root.is_dir() else []
    stores = [EmbeddingStore.open(p) for p in folders]
    stores = [s for s in stores if s is not None and s.dim == dim]
    for gallery in (s for s in stores if s.meta["key"]["split"] == "gallery" and len(s) >= gallery_size):
        for queries in (s for s in stores if s.meta["key"]["split"] == "queries" and len(s) >= query_count):
            if queries.meta["key"]["encoder"] == gallery.meta["key"]["encoder"]:
                return (np.ascontiguousarray(gallery.vectors[:gallery_size]),
                        np.ascontiguousarray(queries.vectors[:query_count]), store_label(gallery.meta["key"]))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)

    def points(n):
        x = centres[rng.integers(0, 1000, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
        faiss.normalize_L2(x)
        return x

    return points(gallery_size), points(query_count), "clustered random vectors"


def best_seconds(function, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def single_query_ms(index, queries: np.ndarray, count: int, k: int = 10) -> float:
    for q in queries[:5]:
        index.search(q[None], k)
    times = []
    for q in queries[:count]:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def single_queries_beside_reads(index, gallery: np.ndarray, queries: np.ndarray, count: int, k: int = 10,
                                block: int = 10, settle_s: float = 0.12) -> tuple[float, float]:
    """Median single-query latency, and the median time to read the gallery the index holds once (summing its
    N*d*4 bytes with torch: the bandwidth limit of a query), in alternating blocks of `block` back-to-back calls:
    close together, so the two see the same machine, and both medians (a best-of-few read against a median
    query would flatter the limit). Each block starts `settle_s` after the other: one library's idle threads
    spin for about 0.1 s after a call (OpenBLAS's after a query, OpenMP's after a read), and alternated call by
    call they took each other's cores (the query came out 1.7x slower)."""
    whole = torch.from_numpy(gallery)
    query_ms, read_ms = [], []
    for start in range(0, count, block):
        for times, call in ((query_ms, lambda q: index.search(q[None], k)), (read_ms, lambda q: whole.sum())):
            time.sleep(settle_s)
            call(queries[start])  # the block's first call wakes its library's threads: not timed
            for q in queries[start:start + block]:
                began = time.perf_counter()
                call(q)
                times.append((time.perf_counter() - began) * 1000)
    return statistics.median(query_ms), statistics.median(read_ms)


def bench_search(gallery: np.ndarray, queries: np.ndarray, source: str, peak: float, bandwidth: float,
                 single_queries: int, k: int = 10, rounds: int = 3) -> dict:
    n, d = gallery.shape
    flops = 2.0 * n * d * len(queries)
    brute = BruteForceIndex(gallery)
    brute.search(queries[:256], k)
    brute_s = best_seconds(lambda: brute.search(queries, k), 2)
    brute_ids = brute.search(queries, k)[1]
    flat = faiss.IndexFlatIP(d)
    flat.add(gallery)
    flat.search(queries[:256], k)
    flat_s = best_seconds(lambda: flat.search(queries, k), 1)
    flat_ids = flat.search(queries, k)[1]
    same = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(brute_ids, flat_ids)]))
    # single queries against the bandwidth limit: reading the gallery's N*d*4 bytes once, in alternating blocks
    figures = {"limit_ms": [], "brute_ms": []}
    for _ in range(rounds):
        query_ms, read_ms = single_queries_beside_reads(brute, brute.gallery, queries, single_queries, k)
        figures["brute_ms"].append(query_ms)
        figures["limit_ms"].append(read_ms)
    limits = figures["limit_ms"]
    figures["bandwidth_gbs"] = [n * d * 4 / (ms / 1000) / 1e9 for ms in limits]
    ratios = [ms / limit for ms, limit in zip(figures["brute_ms"], limits)]
    brute_single, bandwidth_limit_ms = spread(figures["brute_ms"])[0], spread(limits)[0]
    flat_single = single_query_ms(flat, queries, single_queries)
    fp16 = float16_gallery_trial(gallery, queries, brute_ids, single_queries, k)
    return {
        "source": source, "gallery": n, "queries": len(queries), "dim": d, "k": k,
        "brute_batch_s": brute_s, "brute_gflops": flops / brute_s / 1e9, "faiss_flat_batch_s": flat_s,
        "faiss_flat_gflops": flops / flat_s / 1e9, "matmul_peak_gflops": peak,
        "brute_vs_matmul_peak": flops / brute_s / 1e9 / peak, "brute_vs_faiss_flat": flat_s / brute_s,
        "brute_same_neighbours_as_faiss": same,
        "brute_single_query_ms": brute_single, "faiss_flat_single_query_ms": flat_single,
        "memory_bandwidth_gbs": bandwidth, "bandwidth_limit_ms": bandwidth_limit_ms,
        "single_query_vs_bandwidth_limit": spread(ratios)[0], "rounds": rounds,
        "brute_single_query_ms_rounds": figures["brute_ms"], "memory_bandwidth_gbs_rounds": figures["bandwidth_gbs"],
        "single_query_vs_bandwidth_limit_rounds": ratios, "load_average": os.getloadavg(),
        **fp16,
    }


class Float16Gallery:
    """The candidate: the gallery stored in float16 (half the bytes to stream per query), torch.mv."""

    def __init__(self, gallery: np.ndarray):
        self.gallery = torch.from_numpy(gallery).half()

    def search(self, queries: np.ndarray, k: int):
        top = torch.topk(torch.mv(self.gallery, torch.from_numpy(queries[0]).half()).float(), k)
        return top.values.numpy()[None], top.indices.numpy()[None]


def float16_gallery_trial(gallery: np.ndarray, queries: np.ndarray, exact_ids: np.ndarray, count: int,
                          k: int) -> dict:
    """Is a float16 gallery worth keeping for single queries? Only if recall@k stays 1.0."""

    candidate = Float16Gallery(gallery)
    found = np.concatenate([candidate.search(q[None], k)[1] for q in queries[:count]])
    # the rounding of the stored vectors, over every query (computed batched in float32)
    rounded = gallery.astype(np.float16).astype(np.float32)
    rounded_ids = BruteForceIndex(rounded).search(queries, k)[1]
    return {
        "fp16_single_query_ms": single_query_ms(candidate, queries, count, k),
        "fp16_recall_at_10_single": recall_at(found, exact_ids[:count], k),
        "fp16_rounded_gallery_recall_at_10": recall_at(rounded_ids, exact_ids, k),
    }


def bench_ivf(gallery: np.ndarray, queries: np.ndarray, nlist: int, nprobe: int, single_queries: int,
              k: int = 10) -> dict:
    """Same index, same queries: imgret's timed search against bare faiss calls, interleaved."""
    from omegaconf import OmegaConf

    built = build_index(OmegaConf.create({"name": "ivf", "nlist": nlist, "nprobe": nprobe}), gallery)
    bare = built.index.index
    imgret_batch, bare_batch, imgret_p50, bare_p50 = [], [], [], []
    for _ in range(3):
        run = timed_search(built.index, queries, k, latency_queries=single_queries, warmup_queries=20, repeats=1,
                           progress=False)  # one batch call per round, as for bare faiss: the rounds interleave
        imgret_batch.append(run.best_batch_seconds)
        imgret_p50.append(float(np.median(run.latencies_ms)))
        bare_batch.append(best_seconds(lambda: bare.search(queries, k), 1))
        bare_p50.append(single_query_ms(bare, queries, single_queries, k))
    return {
        "nlist": nlist, "nprobe": nprobe, "build_s": built.build_s,
        "imgret_batch_s": min(imgret_batch), "bare_faiss_batch_s": min(bare_batch),
        "imgret_single_ms_p50": min(imgret_p50), "bare_faiss_single_ms_p50": min(bare_p50),
        "ivf_batch_overhead": min(imgret_batch) / min(bare_batch) - 1,
        "ivf_single_overhead": min(imgret_p50) / min(bare_p50) - 1,
        "ivf_harness_overhead": max(min(imgret_batch) / min(bare_batch), min(imgret_p50) / min(bare_p50)) - 1,
    }


# --------------------------------------------------------------------------- memory


def _extract_in_child(archive: Archive, cache: str, count: int, num_workers: str, result_queue) -> None:
    work = Path(cache)
    cfg = compose_cfg("model=resnet18", "model.pretrained=false", "model.image_size=64", f"paths.cache={work}",
                      "extract.progress=false", f"num_workers={num_workers}")
    images = real_images(archive, work, count)
    encoder = build_encoder(cfg.model, cfg.seed)
    key = store_key(images, describe_encoder(cfg.model, cfg.seed)) | {"bench": uuid.uuid4().hex}
    start = time.perf_counter()
    store = extract_store(encoder, images, key, work, cfg, latency_ms=float("nan"))
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


# --------------------------------------------------------------------------- report


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
                              f"extract.strategy={'ddp' if devices > 1 else 'auto'}")
            encoder = build_encoder(cfg.model, cfg.seed)
            key = store_key(images, describe_encoder(cfg.model, cfg.seed)) | {"bench": uuid.uuid4().hex}
            store = extract_store(encoder, images, key, work / "cache", cfg, latency_ms=float("nan"))
            rates[devices].append(store.meta["extraction"]["images_per_s"])
            print(f"  ddp round {attempt + 1}: {devices} process(es): {rates[devices][-1]:.0f} img/s", flush=True)
    ratios = [two / one for one, two in zip(rates[1], rates[2])]
    return {"images": count, "batch_size": batch_size, "rounds": rounds, "one_process_images_per_s": rates[1],
            "two_processes_images_per_s": rates[2], "ratios": ratios,
            "load_average": os.getloadavg()}


def bench_verify(gallery: np.ndarray, work: Path, repeats: int = 3) -> dict:
    """Commit a store of `gallery` (its checksums are computed then), then time opening it, which verifies every
    file, against a plain read of the same bytes (both from the page cache: the best of `repeats`)."""
    folder = work / "verify" / "store"
    staged = StagedStore(folder, "bench")
    staged.staging.mkdir(parents=True)
    np.save(staged.staging / "vectors.npy", gallery)
    np.save(staged.staging / "labels.npy", np.zeros(len(gallery), np.int64))
    (staged.staging / "paths.txt").write_text("\n".join(f"image-{i}" for i in range(len(gallery))))
    (staged.staging / "bad_images.txt").write_text("")
    start = time.perf_counter()
    staged.commit({"count": len(gallery), "dim": gallery.shape[1]})
    commit_s = time.perf_counter() - start

    def verified_open():
        assert EmbeddingStore.open(folder) is not None

    files = [folder / name for name in ("vectors.npy", "labels.npy", "paths.txt")]
    return {"gallery": len(gallery), "dim": gallery.shape[1], "store_bytes": sum(f.stat().st_size for f in files),
            "commit_s": commit_s, "verified_open_s": best_seconds(verified_open, repeats),
            "plain_read_s": best_seconds(lambda: [f.read_bytes() for f in files], repeats)}


def _scale_stage_in_child(stage: str, gallery_dir: str, queries_dir: str, nlist: int, nprobe: int, result_queue) -> None:
    """One stage of the scale part, alone in this process, so its peak resident set is its own: the kernel's
    high-water mark of the process (no sampling thread beside the timed work)."""
    import resource

    from imgret.index.groundtruth import exact_top_k

    gallery, queries = EmbeddingStore(Path(gallery_dir)).vectors, np.asarray(EmbeddingStore(Path(queries_dir)).vectors)
    result = {"stage": stage, "baseline_rss_bytes": psutil.Process().memory_info().rss}
    start = time.perf_counter()
    if stage == "groundtruth":
        exact_top_k(gallery, queries, 10, progress=False)
        result["queries"] = len(queries)
    elif stage == "ivf":
        from omegaconf import OmegaConf

        method = OmegaConf.create({"name": "ivf", "nlist": nlist, "nprobe": nprobe, "train_size": None})
        built = build_index(method, gallery)
        result["build_s"] = time.perf_counter() - start
        search_start = time.perf_counter()
        built.index.search(queries, 10)
        result["search_s"] = time.perf_counter() - search_start
        result["queries"] = len(queries)
        result["setting"] = f"nlist={nlist} nprobe={nprobe}"
    elif stage == "brute_streamed":
        some = queries[:1000]
        BruteForceIndex(gallery, resident_bytes=0).search(some, 10)
        result["queries"] = len(some)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    result_queue.put(result)


def bench_scale(cache: Path, gallery_size: int, query_count: int, dim: int, nlist: int, nprobe: int) -> dict:
    """imgret's own synthetic store (made once, then reused from the cache), then each stage in a fresh process."""
    from imgret.embed.vector_stores import ensure_vector_stores

    cfg = compose_cfg("data=synthetic_vectors", f"data.gallery_size={gallery_size}", f"data.query_size={query_count}",
                      f"data.dim={dim}", f"paths.cache={cache}")
    stores = ensure_vector_stores(cfg)
    gallery_bytes = (stores.gallery.path / "vectors.npy").stat().st_size
    context = multiprocessing.get_context("spawn")
    stages = []
    for stage in ("groundtruth", "ivf", "brute_streamed"):
        print(f"scale: {stage} ...", flush=True)
        queue = context.Queue()
        child = context.Process(target=_scale_stage_in_child, args=(stage, str(stores.gallery.path),
                                                                    str(stores.queries.path), nlist, nprobe, queue))
        child.start()
        child.join()  # the result is a small dict: the queue's pipe holds it until it is read
        if child.exitcode != 0:
            raise RuntimeError(f"the scale part's {stage} stage failed in its process (exit code {child.exitcode})")
        stages.append(queue.get(timeout=30))
    return {"gallery": len(stores.gallery), "dim": stores.gallery.dim, "gallery_bytes": gallery_bytes,
            "load_average": list(os.getloadavg()), "stages": stages}


# Ratios that cannot exceed 1 (a part of a task is not slower than the whole task): above it, the benchmark is wrong.
AT_MOST_ONE = {"extract_vs_forward": "end to end cannot be faster than its own forward pass"}


# Ratios to a physical limit that cannot go below 1 unless the limit does not apply.
AT_LEAST_ONE = {"single_query_vs_bandwidth_limit": "faster than reading the gallery from memory: it came from the "
                                                    "CPU caches, so this gallery is too small for the bound"}


def verdict(name: str, value: float, rounds: tuple[float, float] | None = None) -> str:
    """Whether `value` (a median) meets its target, by how much it misses, and whether the target lies within the
    rounds' spread (min, max), where another run may land on its other side. A ratio bounded by 1 is impossible
    when even its most favourable round lies past 1: the tolerance is the rounds' own spread, not a constant."""
    comparison, bound = TARGETS[name]
    low, high = rounds if rounds is not None else (value, value)
    if name in AT_MOST_ONE and low > 1.0:
        return f"IMPOSSIBLE ({value:.2f}x, every round above 1: {AT_MOST_ONE[name]}): a measurement error, not met"
    if name in AT_LEAST_ONE and high < 1.0:
        return f"NOT A MEASURE OF THE BOUND ({value:.2f}x, every round below 1: {AT_LEAST_ONE[name]})"
    met = value >= bound if comparison == ">=" else value <= bound
    if met:
        said = f"met (target {comparison} {bound:g})"
    else:
        short = bound / value - 1 if comparison == ">=" else value / bound - 1
        said = f"MISSED: target {comparison} {bound:g}, {short:.1%} short"
    if rounds is not None and min(rounds) <= bound <= max(rounds):
        said += f"; the target is within the rounds' {min(rounds):.2f}-{max(rounds):.2f}"
    return said


def table(results: dict) -> str:
    lines = []

    def row(part, measure, value, ratio="", target=""):
        lines.append(f"{part:<9} {measure:<58} {value:>18} {ratio:>9}  {target}")

    row("part", "measure", "value", "ratio", "target")
    lines.append("-" * 130)
    machine = results["machine"]
    row("machine", f"fp32 matmul peak ({machine['threads']} threads; torch {machine['matmul_torch_gflops']:.0f}, "
                   f"numpy {machine['matmul_numpy_gflops']:.0f})", f"{machine['matmul_peak_gflops']:.0f} GFLOP/s")
    row("machine", "memory read bandwidth", f"{machine['memory_bandwidth_gbs']:.1f} GB/s")
    for r in results.get("extract", []):
        name = f"{r['model']} {r['image_size']}px, batch {r['batch_size']}"
        rounds = r.get("rounds", 1)
        e2e, forward, ratios = (spread(r.get(f"{key}_rounds", [r[key]])) for key in
                                ("imgret_images_per_s", "forward_only_images_per_s", "extract_vs_forward"))
        row("extract", f"{name}: imgret end to end, median of {rounds} (min-max)",
            f"{e2e[0]:.0f} ({e2e[1]:.0f}-{e2e[2]:.0f}) img/s")
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
    for r in results.get("precision", []):
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
    if "search" in results:
        s = results["search"]
        name = f"{s['gallery']:,}x{s['dim']}, {s['queries']:,} queries"
        row("search", f"brute force batched ({name})", f"{s['brute_batch_s']:.2f} s")
        row("search", "brute force vs matmul peak", f"{s['brute_gflops']:.0f} GFLOP/s",
            f"{s['brute_vs_matmul_peak']:.2f}x", verdict("brute_vs_matmul_peak", s["brute_vs_matmul_peak"]))
        row("search", "faiss.IndexFlatIP batched", f"{s['faiss_flat_batch_s']:.2f} s",
            f"{s['brute_vs_faiss_flat']:.2f}x", verdict("brute_vs_faiss_flat", s["brute_vs_faiss_flat"]))
        row("search", "same neighbours as faiss (share of top-10)", f"{s['brute_same_neighbours_as_faiss']:.5f}")
        single = spread(s.get("brute_single_query_ms_rounds", [s["brute_single_query_ms"]]))
        ratios = spread(s.get("single_query_vs_bandwidth_limit_rounds", [s["single_query_vs_bandwidth_limit"]]))
        row("search", f"brute single query vs bandwidth limit, median of {s.get('rounds', 1)}",
            f"{single[0]:.2f} ({single[1]:.2f}-{single[2]:.2f}) ms", f"{s['single_query_vs_bandwidth_limit']:.3f}x",
            verdict("single_query_vs_bandwidth_limit", s["single_query_vs_bandwidth_limit"], ratios[1:]) +
            f"; ratios {ratios[1]:.3f}-{ratios[2]:.3f}, load {s.get('load_average', [float('nan')])[0]:.2f}")
        row("search", "  (bandwidth limit: reading the N*d*4 bytes, blocks alternating)", f"{s['bandwidth_limit_ms']:.2f} ms",
            "", f"{s['gallery'] * s['dim'] * 4 / s['bandwidth_limit_ms'] / 1e6:.1f} GB/s")
        row("search", "faiss.IndexFlatIP single query", f"{s['faiss_flat_single_query_ms']:.2f} ms")
        keep = s["fp16_recall_at_10_single"] == 1.0 and s["fp16_rounded_gallery_recall_at_10"] == 1.0
        row("search", "float16 gallery single query (candidate)", f"{s['fp16_single_query_ms']:.2f} ms",
            f"{s['brute_single_query_ms'] / s['fp16_single_query_ms']:.2f}x",
            f"{'kept' if keep else 'rejected'}: recall@10 {s['fp16_rounded_gallery_recall_at_10']:.4f} "
            f"(all queries), {s['fp16_recall_at_10_single']:.4f} (timed ones)")
        row("search", f"  data: {s['source']}"[:58], "")
    if "ivf" in results:
        v = results["ivf"]
        row("ivf", f"nlist={v['nlist']} nprobe={v['nprobe']}: imgret batch vs bare faiss",
            f"{v['imgret_batch_s'] * 1000:.1f} ms", f"{v['ivf_batch_overhead']:+.1%}")
        row("ivf", "imgret single-query p50 vs bare faiss", f"{v['imgret_single_ms_p50']:.3f} ms",
            f"{v['ivf_single_overhead']:+.1%}", verdict("ivf_harness_overhead", v["ivf_harness_overhead"]))
    for m in results.get("memory", []):
        row("memory", f"extract {m['images']:,} images: peak RSS (main + loader processes)",
            f"{m['peak_rss_gb']:.2f} GB", "", verdict("extract_peak_rss_gb", m["peak_rss_gb"]))
        row("memory", "  peak PSS of the process tree (shared pages counted once)", f"{m['peak_pss_gb']:.2f} GB")
    if len(results.get("memory", [])) > 1:
        small, large = results["memory"][0], results["memory"][-1]
        row("memory", f"growth from {small['images']:,} to {large['images']:,} images",
            f"{large['peak_rss_gb'] - small['peak_rss_gb']:+.2f} GB", f"{large['peak_rss_gb'] / small['peak_rss_gb']:.2f}x")
    if "ddp" in results:
        d = results["ddp"]
        one, two, ratios = d["one_process_images_per_s"], d["two_processes_images_per_s"], d["ratios"]
        name = f"resnet18 64px, {d['images']:,} images, {d['rounds']} rounds interleaved"
        row("ddp", f"{name}: 1 process",
            f"{statistics.median(one):.0f} img/s ({min(one):.0f}-{max(one):.0f})")
        row("ddp", "  2 processes, DDP on gloo (median, min-max)",
            f"{statistics.median(two):.0f} img/s ({min(two):.0f}-{max(two):.0f})",
            f"{statistics.median(ratios):.2f}x", f"ratios {min(ratios):.2f}-{max(ratios):.2f}; "
            f"load {d['load_average'][0]:.2f}")
    if "verify" in results:
        v = results["verify"]
        name = f"{v['gallery']:,}x{v['dim']} store, {v['store_bytes'] / 1e6:.0f} MB"
        row("verify", f"open a {name} (sha256 of every file)", f"{v['verified_open_s'] * 1000:.0f} ms",
            f"{v['verified_open_s'] / v['plain_read_s']:.2f}x")
        row("verify", "  the same bytes read once, no checksum", f"{v['plain_read_s'] * 1000:.0f} ms")
        row("verify", "  commit (checksums computed)", f"{v['commit_s'] * 1000:.0f} ms")
    if "scale" in results:
        sc = results["scale"]
        gallery_gb = sc["gallery_bytes"] / 1e9
        row("scale", f"{sc['gallery']:,}x{sc['dim']} gallery, memory-mapped ({gallery_gb:.2f} GB of vectors)", "",
            "", f"load {sc['load_average'][0]:.2f}; peak RSS / gallery bytes in the ratio column")
        for st in sc["stages"]:
            what = {"groundtruth": f"exact ground truth, top-10 of {st['queries']:,} queries",
                    "ivf": f"IVF {st.get('setting', '')}: build, then {st['queries']:,} queries",
                    "brute_streamed": f"brute force streamed, {st['queries']:,} queries"}[st["stage"]]
            row("scale", what, f"{st['seconds']:.1f} s", f"{st['peak_rss_bytes'] / sc['gallery_bytes']:.2f}x",
                f"peak RSS {st['peak_rss_bytes'] / 1e9:.2f} GB (process at start {st['baseline_rss_bytes'] / 1e9:.2f} GB)")
            if st["stage"] == "ivf":
                row("scale", "  of which build / batch search", f"{st['build_s']:.1f} s / {st['search_s']:.2f} s")
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    partial.write_text(json.dumps(results, indent=1))
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m imgret.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="the Tiny-ImageNet zip")
    parser.add_argument("--archive-checksum", default=None,
                        help="sha256:<hex> of --archive when it is not the official zip (a subset of it, for tests)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("IMGRET_CACHE", ".cache/imgret")),
                        help="imgret's cache: the extracted data and any real embeddings for the search parts")
    parser.add_argument("--images", type=int, default=3200, help="images per 64 px model for the extract part")
    parser.add_argument("--clip-images", type=int, default=384, help="images for clip at 224 px")
    parser.add_argument("--precision-images", type=int, default=640,
                        help="images per 64 px model for the precision part (clip: a tenth, at least 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of interleaved measurements (extract: forward only, end to end, ...; search: "
                             "memory bandwidth, single queries, ...)")
    parser.add_argument("--num-workers", default="auto", help="data-loader processes (default: imgret's auto)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--single-queries", type=int, default=200, help="single-query calls timed per method")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ddp-images", type=int, default=6400, help="images extracted per round of the ddp part")
    parser.add_argument("--memory-sizes", default="10000,100000", help="gallery sizes for the memory part")
    parser.add_argument("--scale-gallery", type=int, default=1_280_000, help="gallery size for the scale part")
    parser.add_argument("--scale-nlist", type=int, default=4096, help="IVF lists for the scale part")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="default: outputs/bench/bench-<time>.json")
    args = parser.parse_args(argv)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    archive = Archive(args.archive, args.archive_checksum)
    if ({"extract", "precision", "memory", "ddp"} & set(parts)) and not args.archive.is_file():
        parser.error(f"--archive {args.archive} does not exist: the extract, precision, memory and ddp parts read "
                     "real images")
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    results: dict = {"machine": {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                                 "torch": torch.__version__, "faiss": faiss.__version__},
                     "targets": {k: f"{c} {b}" for k, (c, b) in TARGETS.items()}, "parts": parts}
    print("measuring the machine's limits ...", flush=True)
    rates = matmul_peak_gflops()
    results["machine"].update({f"matmul_{lib}_gflops": rate for lib, rate in rates.items()})
    results["machine"]["matmul_peak_gflops"] = max(rates.values())
    results["machine"]["memory_bandwidth_gbs"] = memory_bandwidth_gbs()
    with tempfile.TemporaryDirectory(prefix="imgret-bench-") as scratch:
        work = Path(scratch)
        (work / "cache").mkdir()
        data_link = work / "cache" / "data"
        if (args.cache / "data").is_dir():  # reuse an extraction already made instead of repeating it
            data_link.symlink_to((args.cache / "data").resolve())
        if "extract" in parts:
            print("extract: resnet18, mobilenet at 64 px; clip at 224 px ...", flush=True)
            models = [("resnet18", 64, args.images), ("mobilenet", 64, args.images), ("clip", 224, args.clip_images)]
            results["extract"] = bench_extract(archive, work, results["machine"]["matmul_peak_gflops"], models,
                                               args.batch_size, args.num_workers, not args.no_channels_last,
                                               args.rounds)
        if "precision" in parts:
            print("precision: bf16-mixed against fp32 forwards ...", flush=True)
            # bf16 without the CPU's BF16 instructions is emulated and several times slower: fewer images
            count = args.precision_images
            models = [("resnet18", 64, count), ("mobilenet", 64, count), ("clip", 224, max(8, count // 10))]
            results["precision"] = bench_precision(archive, work, models, args.batch_size, args.rounds)
        if {"search", "ivf", "verify"} & set(parts):
            gallery, queries, source = search_data(args.cache, args.gallery, args.queries, args.dim)
            if "search" in parts:
                print(f"search: {len(gallery):,} x {args.dim} gallery, {len(queries):,} queries ({source}) ...",
                      flush=True)
                results["search"] = bench_search(gallery, queries, source, results["machine"]["matmul_peak_gflops"],
                                                 results["machine"]["memory_bandwidth_gbs"], args.single_queries,
                                                 rounds=args.rounds)
            if "ivf" in parts:
                print(f"ivf: nlist={args.nlist} nprobe={args.nprobe} ...", flush=True)
                results["ivf"] = bench_ivf(gallery, queries, args.nlist, args.nprobe, max(1000, args.single_queries))
        if "ddp" in parts:
            print(f"ddp: extracting {args.ddp_images:,} images with 1 and 2 processes ...", flush=True)
            results["ddp"] = bench_ddp(archive, work, args.ddp_images, args.batch_size)
        if "verify" in parts:
            print(f"verify: opening a checksummed {len(gallery):,} x {args.dim} store ...", flush=True)
            results["verify"] = bench_verify(gallery, work)
        if "scale" in parts:
            print(f"scale: {args.scale_gallery:,} x {args.dim} synthetic vectors ...", flush=True)
            results["scale"] = bench_scale(args.cache, args.scale_gallery, args.queries, args.dim, args.scale_nlist,
                                           args.nprobe)
        if "memory" in parts:
            sizes = [int(s) for s in args.memory_sizes.split(",")]
            print(f"memory: extracting {', '.join(f'{s:,}' for s in sizes)} images in fresh processes ...", flush=True)
            results["memory"] = bench_memory(archive, work, sizes, args.num_workers)
    text = table(results)
    results["table"] = text
    path = args.json or Path("outputs") / "bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(results, path)
    print(text)
    print(f"\nwritten to {path}")
    return results


def console() -> None:
    """The `imgret-bench` command: exit 0 when done (main's return value is for callers in Python)."""
    main()


if __name__ == "__main__":
    main()
