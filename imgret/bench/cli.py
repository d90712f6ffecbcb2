"""`python -m imgret.bench`: the parts in order, each one module (imgret/bench/<part>.py: `run`, `rows`), their
table, and the JSON of every figure."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import faiss
import torch

from imgret.bench import allocator, ddp, extract, filtered, ivf, libraries, memory, precision, scale, search, verify
from imgret.bench.machine import DEFAULT_ARCHIVE, Archive, Context, matmul_peak_gflops, memory_bandwidth_gbs
from imgret.bench.verdicts import TARGETS
from imgret.embed.precision import PRECISION_FLAGS, cpu_flags, cpu_info
from imgret.options import default_cache_dir

# The parts, in the order they run (memory last: it starts fresh processes of its own).
PARTS = {"extract": extract, "precision": precision, "allocator": allocator, "search": search, "filtered": filtered, "ivf": ivf, "libraries": libraries, "ddp": ddp, "verify": verify,
         "scale": scale, "memory": memory}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m imgret.bench", description="imgret's speed against this machine's limits and the obvious alternatives")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="the Tiny-ImageNet zip")
    parser.add_argument("--archive-checksum", default=None,
                        help="sha256:<hex> of --archive when it is not the official zip (a subset of it, for tests)")
    parser.add_argument("--cache", type=Path, default=Path(default_cache_dir()),
                        help="imgret's cache (imgret.run's paths.cache): the extracted data and any real embeddings "
                        "for the search parts")
    parser.add_argument("--images", type=int, default=3200, help="images per 64 px model for the extract part")
    parser.add_argument("--clip-images", type=int, default=384, help="images for clip at 224 px")
    parser.add_argument("--precision-images", type=int, default=640,
                        help="images per 64 px model for the precision part (clip: a tenth, at least 8; "
                             "efficientnet_lite0: a half)")
    parser.add_argument("--precision-models", default="resnet18,mobilenet,clip,efficientnet_lite0",
                        help="the precision part's models, from resnet18, mobilenet, clip, efficientnet_lite0 (trained)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--allocator-seconds", type=float, default=5.0,
                        help="seconds of forwards each allocator probe times (allocator part)")
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
    parser.add_argument("--libraries-gallery", type=int, default=20_000,
                        help="gallery rows each ANN library builds over in the libraries part")
    parser.add_argument("--libraries-queries", type=int, default=2_000, help="queries in the libraries part")
    parser.add_argument("--libraries-methods", default=None,
                        help="the libraries part's methods, comma-separated (default: every installed one)")
    parser.add_argument("--ddp-images", type=int, default=6400, help="images extracted per round of the ddp part")
    parser.add_argument("--memory-sizes", default="10000,100000", help="gallery sizes for the memory part")
    parser.add_argument("--scale-gallery", type=int, default=1_280_000, help="gallery size for the scale part")
    parser.add_argument("--scale-nlist", type=int, default=4096, help="IVF lists for the scale part")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="default: outputs/bench/bench-<time>.json")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.libraries_methods is not None:
        from imgret.index.methods import METHODS

        args.libraries_methods = [m.strip() for m in args.libraries_methods.split(",") if m.strip()]
        if not args.libraries_methods or set(args.libraries_methods) - set(METHODS):
            parser.error(f"--libraries-methods {','.join(args.libraries_methods) or '(none)'}: allowed, "
                         f"comma-separated: {', '.join(METHODS)}")
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    if any(PARTS[p].NEEDS_IMAGES for p in args.parts) and not args.archive.is_file():
        parser.error(f"--archive {args.archive} does not exist: the extract, precision, memory and ddp parts read "
                     "real images")
    return args



def machine_limits() -> dict:
    print("measuring the machine's limits ...", flush=True)
    found = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
             "faiss": faiss.__version__, "cpu": cpu_info()["model"],
             "cpu_flags": " ".join(flag for flag in PRECISION_FLAGS if flag in cpu_flags()) or "none"}
    rates = matmul_peak_gflops()
    found.update({f"matmul_{lib}_gflops": rate for lib, rate in rates.items()})
    found["matmul_peak_gflops"] = max(rates.values())
    found["memory_bandwidth_gbs"] = memory_bandwidth_gbs()
    return found


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    results: dict = {"machine": machine_limits(), "targets": {k: f"{c} {b}" for k, (c, b) in TARGETS.items()},
                     "parts": args.parts}
    with tempfile.TemporaryDirectory(prefix="imgret-bench-") as scratch:
        work = Path(scratch)
        (work / "cache").mkdir()
        # the archive unpacked once, into imgret's own cache (as a run would), and reused from there
        (args.cache / "data").mkdir(parents=True, exist_ok=True)
        (work / "cache" / "data").symlink_to((args.cache / "data").resolve())
        context = Context(args, Archive(args.archive, args.archive_checksum), work, results["machine"])
        for name, part in PARTS.items():
            if name in args.parts:
                results[name] = part.run(context)
    text = table(results)
    results["table"] = text
    path = args.json or Path("outputs") / "bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(results, path)
    print(text)
    print(f"\nwritten to {path}")
    return results


def table(results: dict) -> str:
    """The machine's limits, then each part's own rows, in the parts' order."""
    lines = []

    def row(part, measure, value, ratio="", target=""):
        lines.append(f"{part:<9} {measure:<58} {value:>18} {ratio:>9}  {target}")

    row("part", "measure", "value", "ratio", "target")
    lines.append("-" * 130)
    machine = results["machine"]
    row("machine", f"fp32 matmul peak ({machine['threads']} threads; torch {machine['matmul_torch_gflops']:.0f}, "
                   f"numpy {machine['matmul_numpy_gflops']:.0f})", f"{machine['matmul_peak_gflops']:.0f} GFLOP/s")
    row("machine", "memory read bandwidth", f"{machine['memory_bandwidth_gbs']:.1f} GB/s")
    if "cpu" in machine:
        row("machine", f"{machine['cpu']}, {machine['cpu_count']} cores", "", "", f"flags: {machine['cpu_flags']}")
    for name, part in PARTS.items():
        if name in results:
            part.rows(results[name], row)
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    partial.write_text(json.dumps(results, indent=1))
    os.replace(partial, path)


def console() -> None:
    """The `imgret-bench` command: exit 0 when done (main's return value is for callers in Python)."""
    main()
