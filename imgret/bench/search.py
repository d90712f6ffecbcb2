"""The search part: exact search over a gallery: imgret's brute force against the matmul limit and
faiss.IndexFlatIP; single-query latency against the memory-bandwidth limit, in alternating blocks; a float16
gallery as a candidate."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from imgret.embed.store import EmbeddingStore
from imgret.index.brute import BruteForceIndex
from imgret.measure.metrics import recall_at
from imgret.measure.timing import best_seconds, spread
from imgret.bench.machine import Context
from imgret.bench.verdicts import verdict


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
    call they took each other's cores and slowed the query."""
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


NEEDS_IMAGES = False


def run(ctx: Context) -> dict:
    gallery, queries, source = ctx.search_data(search_data)
    print(f"search: {len(gallery):,} x {ctx.args.dim} gallery, {len(queries):,} queries ({source}) ...", flush=True)
    return bench_search(gallery, queries, source, ctx.machine["matmul_peak_gflops"], ctx.machine["memory_bandwidth_gbs"],
                        ctx.args.single_queries, rounds=ctx.args.rounds)


def rows(result: dict, row) -> None:
    s = result
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
