"""The precision part: per model, each backend and precision (PyTorch eager bf16-mixed; OpenVINO fp32, bf16 and
int8) against PyTorch eager fp32, interleaved; the rate each achieves against the matmul peak of its own precision;
and what it changes: the cosine of each image's two rows, and recall@10 of its rows' exact search against the fp32
rows' exact neighbours. What it costs in precision@10 and mAP@10: experiments/precision_study.yaml."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from imgret.api import Embedder
from imgret.embed.backends import NormalisedNetwork, make_forward
from imgret.embed.models import build_encoder
from imgret.embed.precision import BF16_FLAGS, INT8_FLAGS, PRECISION_FLAGS, cpu_flags
from imgret.measure.timing import best_rate, interleaved, spread
from imgret.bench.machine import Archive, Context, compose_cfg
from imgret.bench.extract import flops_per_image, forward_only_images_per_s, real_images, rows_agreement

# (backend, precision) pairs measured against PyTorch eager fp32, the reference
VARIANTS = (("torch", "bf16-mixed"), ("openvino", "32-true"), ("openvino", "bf16-mixed"), ("openvino", "int8"))
REFERENCE = ("torch", "32-true")
PEAK_OF = {"32-true": "fp32", "bf16-mixed": "bf16", "int8": "int8"}


# The instructions that make a precision's matrix products native; without them oneDNN emulates that precision,
# and a "peak" of emulated products would measure the emulation, not the machine.
NATIVE_FLAGS = {"bf16": BF16_FLAGS, "int8": INT8_FLAGS}
# Without its flags, PyTorch emulates bf16 at a fraction of fp32's speed: such a variant's rows are compared on
# one batch. int8 without VNNI still runs real int8 instructions (AVX2), only without a peak to compare with.
EMULATED = ("bf16",)
SHORT_BATCH = 4  # images an emulated variant is timed and compared on


def emulated(peak_name: str, flags: frozenset[str]) -> str | None:
    """One line saying `peak_name` (bf16, int8) has no native matrix products on a CPU with these `flags`, or None
    where it has."""
    needs = NATIVE_FLAGS.get(peak_name, ())
    if not needs or any(flag in flags for flag in needs):
        return None
    how = "emulated" if peak_name in EMULATED else "without VNNI"
    return f"{peak_name}: {how} on this CPU (no {' / '.join(needs)}), not a peak"


def variant_note(variant: tuple[str, str], embedder: Embedder, flags: frozenset[str]) -> str | None:
    """Why a variant has no peak to compare with, and what OpenVINO really compiled where it is not what was asked
    (a bf16 hint on a CPU without bf16 instructions runs f32)."""
    note = emulated(PEAK_OF[variant[1]], flags)
    ran = getattr(embedder.forward, "inference_precision", None)
    if note and ran and variant[1] == "bf16-mixed" and ran != "bf16":
        note = f"{note}; OpenVINO compiled it as {ran}"
    return note


def precision_peaks_gops(seconds: float = 2.0, fp32_peak: float = 0.0,
                         flags: frozenset[str] | None = None) -> dict[str, float | None]:
    """The best rate of square products in each precision through torch (oneDNN), sized within `seconds` each
    (`best_rate`): fp32 and bf16 GEMM, int8 GEMM (torch._int_mm, int32 sums); fp32 also no lower than `fp32_peak`
    (the machine's, the better of torch and numpy). A precision the CPU's `flags` do not run natively has no peak
    (None). A forward's rate counts the direct convolution's FLOPs: a backend that computes fewer (Winograd
    convolutions) can show more than 1x of a peak measured so."""
    flags = cpu_flags() if flags is None else flags
    makers = {"fp32": (lambda n: torch.randn(n, n), torch.matmul),
              "bf16": (lambda n: torch.randn(n, n).to(torch.bfloat16), torch.matmul),
              "int8": (lambda n: torch.randint(-127, 128, (n, n), dtype=torch.int8), torch._int_mm)}
    peaks: dict[str, float | None] = {}
    for name, (make, product) in makers.items():
        if emulated(name, flags):
            peaks[name] = None
            continue
        operands: dict = {}

        def call(n, make=make, product=product, operands=operands):
            a, b = operands.setdefault(n, (make(n), make(n)))
            product(a, b)

        peaks[name] = best_rate(call, lambda n: 2 * n ** 3 / 1e9, seconds)
    peaks["fp32"] = max(peaks["fp32"], fp32_peak)
    return peaks


def variant_embedder(encoder, backend: str, precision: str, work: Path, images) -> Embedder:
    preprocessing = encoder.preprocessing()
    module = NormalisedNetwork(encoder.network, preprocessing.mean, preprocessing.std, channels_last=True)
    forward = make_forward(backend, precision, module, {**encoder.description, "bench": True}, work / "cache",
                           images, preprocessing, 89_478_485)
    return Embedder(encoder, "cpu", precision, True, forward=forward)


def bench_precision(archive: Archive, work: Path, models: list[tuple[str, int, int, bool]], batch_size: int,
                    rounds: int = 3, peaks: dict | None = None, seconds: float = 1.0) -> list[dict]:
    """Every variant against PyTorch eager fp32 for each model (name, image size, images, trained weights), each
    forward measurement bounded by `seconds`. A variant the CPU emulates is timed and compared on `SHORT_BATCH`
    images."""
    flags = cpu_flags()
    peaks = peaks or precision_peaks_gops(flags=flags)
    rows = []
    for model, image_size, count, trained in models:
        size = [f"model.image_size={image_size}"] if image_size else []
        cfg = compose_cfg(f"model={model}", f"model.pretrained={str(trained).lower()}", *size,
                          f"paths.cache={work / 'cache'}")
        images = real_images(archive, work / "cache", count)
        encoder = build_encoder(cfg.model, cfg.seed)
        size = encoder.description["image_size"]
        began = time.perf_counter()
        print(f"  precision {model} {size}px ({'trained' if trained else 'random'} weights): converting and "
              f"quantizing ...", flush=True)
        embedders = {REFERENCE: Embedder(encoder, "cpu", "32-true")}
        embedders.update({variant: variant_embedder(encoder, *variant, work, images) for variant in VARIANTS})
        batch = min(batch_size, count)
        print(f"  precision {model} {size}px: {rounds} rounds of {len(embedders)} forwards, {seconds:g} s each",
              flush=True)
        names = {variant: "/".join(variant) for variant in embedders}
        notes = {variant: variant_note(variant, embedders[variant], flags) for variant in embedders}
        batches = {v: min(batch, SHORT_BATCH) if notes[v] and PEAK_OF[v[1]] in EMULATED else batch for v in embedders}
        prepared = [embedders[REFERENCE].prepare([images.open(i) for i in range(start, min(start + batch, count))])
                    for start in range(0, count, batch)]
        timed = {v: [] for v in embedders}  # the rows of each timed call: every image's, where they are one batch
        figures = interleaved({names[v]: (lambda v=v, e=e: forward_only_images_per_s(
            e, prepared[0][:batches[v]], seconds, timed[v])) for v, e in embedders.items()}, rounds)
        vectors = {v: timed[v][-1] if len(prepared) == 1 or batches[v] < batch else
                   np.concatenate([e.embed_prepared(ready) for ready in prepared]) for v, e in embedders.items()}
        print(f"  precision {model} {size}px: measured in {time.perf_counter() - began:.0f} s", flush=True)
        gflops = flops_per_image(encoder, size) / 1e9
        use = {v: figures[names[v]] for v in embedders}  # (images/s, kernel share, faults per image) a round
        figures = {names[v]: [rate for rate, _, _ in use[v]] for v in embedders}
        reference = figures[names[REFERENCE]]
        for variant, embedder in embedders.items():
            ratios = [v / f for f, v in zip(reference, figures[names[variant]])]
            rate = spread(figures[names[variant]])[0]
            peak_name = PEAK_OF[variant[1]]
            peak = peaks[peak_name]
            rows.append({
                "model": model, "image_size": size, "weights": "trained" if trained else "random",
                "backend": variant[0], "precision": variant[1], "images": count, "batch_size": batches[variant],
                "rounds": rounds, "seconds_per_measurement": seconds, "images_per_s_rounds": figures[names[variant]],
                "kernel_share_rounds": [share for _, share, _ in use[variant]],
                "minor_faults_per_image_rounds": [faults for _, _, faults in use[variant]],
                "vs_fp32_eager_rounds": ratios, "vs_fp32_eager": spread(ratios)[0],
                "gflops_per_image": gflops, "achieved_gops": rate * gflops, "peak_of_precision": peak_name,
                "peak_gops": peak, "vs_peak": rate * gflops / peak if peak else None, "peak_note": notes[variant],
                "agreement_images": len(vectors[variant]),
                **rows_agreement(vectors[REFERENCE][:len(vectors[variant])], vectors[variant]),
                "cpu_flags": " ".join(f for f in PRECISION_FLAGS if f in flags) or "none",
                "load_average": os.getloadavg(),
            })
    return rows


NEEDS_IMAGES = True


def run(ctx: Context) -> list[dict]:
    print("precision: each backend and precision against PyTorch eager fp32 ...", flush=True)
    count = ctx.args.precision_images
    small = max(8, count // 10)  # a 224 px forward costs about (224/64)^2 of a 64 px one
    known = {"resnet18": (64, count, False), "mobilenet": (64, count, False), "clip": (None, small, False),
             "efficientnet_lite0": (None, max(small, count // 2), True)}
    wanted = [name for name in ctx.args.precision_models.split(",") if name]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"--precision-models: {', '.join(unknown)} unknown; allowed: {', '.join(known)}")
    models = [(name, *known[name]) for name in wanted]
    peaks = precision_peaks_gops(fp32_peak=ctx.machine["matmul_peak_gflops"])
    for name in peaks:
        if emulated(name, cpu_flags()):
            print(f"  {emulated(name, cpu_flags())}", flush=True)
    ctx.machine.update({f"{name}_peak_gops": rate for name, rate in peaks.items()})
    return bench_precision(ctx.archive, ctx.work, models, ctx.args.batch_size, ctx.args.rounds, peaks)


def rows(result: list, row) -> None:
    if result:
        row("precision", "CPU flags that decide precision", result[0]["cpu_flags"])
    for r in result:
        name = f"{r['model']} {r['image_size']}px {r['weights']}, {r['backend']} {r['precision']}"
        rate, ratios = spread(r["images_per_s_rounds"]), spread(r["vs_fp32_eager_rounds"])
        row("precision", f"{name}: img/s, median of {r['rounds']}", f"{rate[0]:.0f} ({rate[1]:.0f}-{rate[2]:.0f})",
            f"{r['vs_fp32_eager']:.2f}x", f"vs eager fp32, ratios {ratios[1]:.2f}-{ratios[2]:.2f}, "
                                         f"load {r['load_average'][0]:.2f}")
        if "kernel_share_rounds" in r:
            row("precision", f"{name}: kernel share; minor faults per image",
                f"{spread(r['kernel_share_rounds'])[0]:.2f}", f"{spread(r['minor_faults_per_image_rounds'])[0]:,.0f}")
        if r["peak_gops"]:
            row("precision", f"{name}: vs {r['peak_of_precision']} matmul peak", f"{r['achieved_gops']:.0f} G/s",
                f"{r['vs_peak']:.2f}x", f"peak {r['peak_gops']:.0f} G/s" + (
                    "; above 1x: fewer FLOPs than the direct count (Winograd)" if r["vs_peak"] > 1 else ""))
        else:
            row("precision", f"{name}: achieved", f"{r['achieved_gops']:.0f} G/s", "", r["peak_note"])
        row("precision", f"{name}: rows cosine min / mean; recall@10 vs fp32",
            f"{r['cosine_min']:.4f}/{r['cosine_mean']:.4f}", f"{r['recall_at_10']:.4f}",
            f"over {r['agreement_images']} images")
