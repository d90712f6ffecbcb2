"""The libraries part: for every ANN method and vector database whose library is installed, imgret's timed search
against a bare loop of the library's own calls (`Method.bare`: a database's client calls, SQL or its API, through
one session) on the same built index, queries and setting, interleaved over rounds; batch and one query per call,
on one thread (ann-benchmarks' protocol). Each figure is the median of its rounds."""
from __future__ import annotations

import importlib.metadata

import faiss
import numpy as np

from imgret.bench.harness import BareCalls, against_bare
from imgret.bench.machine import Context
from imgret.bench.search import search_data
from imgret.bench.verdicts import verdict
from imgret.errors import ConfigError
from imgret.index.base import plain_rows
from imgret.index.build import build_index
from imgret.index.methods import METHODS, MethodSettings
from imgret.measure.search import search_threads
from imgret.measure.timing import spread

NEEDS_IMAGES = False
LEVEL = 5  # each method's middle query setting (conf/method/<name>.yaml, `levels`)


def method_config(name: str, nlist: int):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="imgret.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={name}", f"nlist={nlist}"])
        if "levels" in cfg.method:
            cfg.level = LEVEL
        return MethodSettings.of(cfg.method)


def installed(method) -> str:
    """The library and version a method's figures were measured with (FAISS's methods: faiss itself)."""
    if not method.install:
        return f"faiss {faiss.__version__}"
    name = method.install.split()[-1].split("==")[0]
    return f"{name} {importlib.metadata.version(name)}"


def bench_method(name: str, gallery: np.ndarray, queries: np.ndarray, single_queries: int, rounds: int,
                 nlist: int, k: int = 10) -> dict:
    cfg = method_config(name, nlist)
    method = METHODS[name]
    built = build_index(cfg, gallery)
    setting = method.query_setting(cfg)
    bare = BareCalls(lambda rows, k: method.bare(built.native, rows, k, setting, 1))
    try:
        with search_threads(1):
            figures = against_bare(built.index, bare, queries, k, single_queries, rounds)
    finally:
        built.close()  # a database's server stopped
    return {"method": name, "library": installed(method), "setting": setting, "build_s": built.build_s, **figures}


def run(ctx: Context) -> dict:
    gallery, queries, label = ctx.search_data(search_data)
    gallery = gallery[:ctx.args.libraries_gallery]
    # writable rows for both sides: some bindings (Voyager's) refuse a read-only memory map's rows in their own call
    queries = plain_rows(queries[:ctx.args.libraries_queries])
    results, skipped = [], {}
    chosen = ctx.args.libraries_methods or list(METHODS)
    for name, method in METHODS.items():
        if name not in chosen:
            continue
        if method.exact and not method.module:
            continue  # imgret's own brute force and FAISS Flat: no library call to compare against but faiss's
        try:
            method.library()
        except ConfigError as missing:
            skipped[name] = str(missing)
            print(f"libraries: {name} skipped: {missing}", flush=True)
            continue
        print(f"libraries: {name} over {len(gallery):,} x {gallery.shape[1]} ({label}) ...", flush=True)
        results.append(bench_method(name, gallery, queries, ctx.args.single_queries, ctx.args.rounds,
                                    min(ctx.args.nlist, len(gallery) // 39)))
        done = results[-1]  # on screen as it finishes: a long run stopped midway still said these
        print(f"libraries: {name}: imgret vs bare, batch {done['batch_overhead']:+.1%}, single query "
              f"{done['single_overhead']:+.1%} (medians of {done['rounds']} rounds)", flush=True)
    return {"data": label, "gallery": len(gallery), "queries": len(queries), "methods": results, "skipped": skipped,
            "libraries_harness_overhead": max((max(r["batch_overhead"], r["single_overhead"]) for r in results),
                                              default=float("nan"))}


def rows(result: dict, row) -> None:
    for v in result["methods"]:
        batch, single = spread(v["batch_ratios"]), spread(v["single_ratios"])
        setting = " ".join(f"{k}={x}" for k, x in v["setting"].items())
        library = f" ({v['library']})" if "library" in v else ""  # runs before it was recorded: not said
        row("libraries", f"{v['method']}{library} {setting}: imgret batch calls of "
                         f"{v.get('batch_rows', 'all')} queries vs bare library calls, median of {v['rounds']}",
            f"{v['imgret_batch_s'] * 1000:.1f} ms",
            f"{v['batch_overhead']:+.1%}",
            verdict("ivf_harness_overhead", v["batch_overhead"], (batch[1] - 1, batch[2] - 1)) +
            f"; ratios {batch[1]:.3f}-{batch[2]:.3f}")
        row("libraries", f"{v['method']}: imgret single-query p50 vs bare", f"{v['imgret_single_ms_p50']:.3f} ms",
            f"{v['single_overhead']:+.1%}", verdict("ivf_harness_overhead", v["single_overhead"],
                                                    (single[1] - 1, single[2] - 1)) +
            f"; ratios {single[1]:.3f}-{single[2]:.3f}")
    for name, why in result.get("skipped", {}).items():
        row("libraries", f"{name}: not measured", "-", "-", why)
