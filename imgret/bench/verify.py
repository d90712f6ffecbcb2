"""The verify part: what trusting the cache costs: opening (checksum-verifying) a committed store against reading
its bytes once."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from imgret.embed.store import EmbeddingStore, StagedStore
from imgret.measure.timing import best_seconds
from imgret.bench.machine import Context
from imgret.bench.search import search_data


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


NEEDS_IMAGES = False


def run(ctx: Context) -> dict:
    gallery, _, _ = ctx.search_data(search_data)
    print(f"verify: opening a checksummed {len(gallery):,} x {ctx.args.dim} store ...", flush=True)
    return bench_verify(gallery, ctx.work)


def rows(result: dict, row) -> None:
    v = result
    name = f"{v['gallery']:,}x{v['dim']} store, {v['store_bytes'] / 1e6:.0f} MB"
    row("verify", f"open a {name} (sha256 of every file)", f"{v['verified_open_s'] * 1000:.0f} ms",
        f"{v['verified_open_s'] / v['plain_read_s']:.2f}x")
    row("verify", "  the same bytes read once, no checksum", f"{v['plain_read_s'] * 1000:.0f} ms")
    row("verify", "  commit (checksums computed)", f"{v['commit_s'] * 1000:.0f} ms")
