"""`extract.backend=auto`: the fastest backend whose rows are PyTorch eager fp32's.

On the CPU at fp32, OpenVINO's fp32 is compared with PyTorch eager once per model and machine, on a sample of the
gallery spread over it: it is chosen only when every row's cosine with eager's is at least `EQUAL_COSINE`, every
image's top-10 neighbours within the sample are the same images, and it runs at least `FASTER_BY` times eager's
images/s (interleaved calls on the same batch). The verdict, its figures and its reasons are cached under
paths.cache/backends, keyed by the model's description and the machine (CPU, flags, threads, library versions),
and become the run's tags. Elsewhere auto is PyTorch: on a GPU, at a precision PyTorch runs (bf16 where the CPU
has it), or without OpenVINO; int8 runs on OpenVINO. A store is keyed by the backend that made it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgret.allocator import kept_freed_memory
from imgret.cache import file_lock
from imgret.embed.backends import NormalisedNetwork, calibration_indices, make_forward
from imgret.embed.models import build_encoder, describe_encoder
from imgret.embed.options import ExtractSettings
from imgret.embed.precision import cpu_info
from imgret.embed.resolve import resolve_device, resolve_precision, store_encoder_description
from imgret.errors import BadImage

log = logging.getLogger(__name__)

EQUAL_COSINE = 0.99999  # a row this close to eager's is the same row for retrieval
FASTER_BY = 1.05        # below this, the reference (eager) stays: a closer ratio is within a shared machine's noise
CHECK_IMAGES = 64       # gallery images the rows are compared on (top-10 neighbours among themselves)
TIMED_IMAGES = 32       # of those, the batch both backends are timed on
ROUNDS = 3              # interleaved rounds of one call each


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # what runs the forward: torch | openvino
    reason: str   # one line, for the log and the run's tags

    def tags(self) -> dict[str, str]:
        return {"extract_backend": self.backend, "extract_backend_reason": self.reason}


def choose_backend(settings: ExtractSettings, gallery) -> BackendChoice:
    """The backend `settings.backend` stands for on this machine (auto: measured on `gallery`, once)."""
    if settings.backend != "auto":
        return BackendChoice(settings.backend, "asked for (extract.backend)")
    device = resolve_device(settings.device)
    precision = resolve_precision(settings, device)
    if precision == "int8":
        return BackendChoice("openvino", "auto: int8 runs on OpenVINO (NNCF's quantization)")
    if device != "cpu":
        return BackendChoice("torch", f"auto on {device}: PyTorch")
    if precision != "32-true":
        return BackendChoice("torch", f"auto: PyTorch, at {precision} (extract.precision); auto compares fp32 "
                             "backends only")
    if importlib.util.find_spec("openvino") is None:
        return BackendChoice("torch", "auto: PyTorch, OpenVINO is not installed")
    path = verdict_path(settings)
    try:
        with file_lock(path, f"the backend comparison {path.name}"):
            verdict = read_verdict(path)
            if verdict is None:
                verdict = compare_backends(settings, gallery)
                if verdict is None:  # nothing to compare on: the extraction says what is wrong with the images
                    return BackendChoice("torch", "auto: PyTorch, no gallery image could be read to compare on")
                write_verdict(path, verdict)
    except (OSError, RuntimeError) as error:  # a full or unwritable cache: the stores' own checks then say so
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        log.warning("extract.backend=auto could not compare the backends (%s): PyTorch", first)
        return BackendChoice("torch", f"auto: PyTorch, the comparison with OpenVINO failed: {first}")
    return BackendChoice(verdict["backend"], verdict["reason"])


def with_backend(settings: ExtractSettings, gallery) -> ExtractSettings:
    """`settings` with `auto` replaced by the backend it stands for here."""
    if settings.backend != "auto":
        return settings
    return dataclasses.replace(settings, backend=choose_backend(settings, gallery).backend)


def machine_key(settings: ExtractSettings) -> dict:
    import openvino

    cpu = cpu_info()
    return {"cpu": cpu["model"], "flags": hashlib.sha256(" ".join(sorted(cpu["flags"].split())).encode()).hexdigest()[:12],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "openvino": openvino.__version__}


def verdict_path(settings: ExtractSettings) -> Path:
    key = {"encoder": describe_encoder(settings.model, settings.seed), "decoder": settings.decoder,
           "channels_last": settings.channels_last, "machine": machine_key(settings)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(settings.cache_dir) / "backends" / f"{settings.model.name or 'model'}-{digest}.json"


def read_verdict(path: Path) -> dict | None:
    """A cached verdict, or None (none yet, or a file that does not read as one: compared again)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        verdict = json.loads(path.read_text())
        if verdict["backend"] in ("torch", "openvino") and isinstance(verdict["reason"], str):
            return verdict
    return None


def write_verdict(path: Path, verdict: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(verdict, indent=1))
    os.replace(partial, path)


def sample_batch(settings: ExtractSettings, preprocessing, gallery) -> torch.Tensor:
    images = []
    for index in calibration_indices(len(gallery), CHECK_IMAGES):
        with contextlib.suppress(BadImage):
            images.append(preprocessing.load(gallery.paths[int(index)], settings.max_image_pixels))
    return preprocessing.batch(images)


def unit_rows(features: torch.Tensor) -> np.ndarray:
    rows = features.detach().float().numpy().astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def same_neighbours(reference: np.ndarray, candidate: np.ndarray, depth: int = 10) -> bool:
    """Whether every row's top-`depth` neighbours among the other rows are the same rows in both."""
    depth = min(depth, len(reference) - 1)

    def top(rows):
        similarity = rows @ rows.T
        np.fill_diagonal(similarity, -np.inf)
        return np.sort(np.argsort(-similarity, axis=1, kind="stable")[:, :depth], axis=1)

    return depth > 0 and bool(np.array_equal(top(reference), top(candidate)))


def compare_backends(settings: ExtractSettings, gallery) -> dict | None:
    """OpenVINO fp32 against PyTorch eager fp32 on a sample of `gallery`: the same rows, and which is faster (None
    where fewer than two of the sampled images can be read)."""
    encoder = build_encoder(settings.model, settings.seed)
    preprocessing = encoder.preprocessing(settings.decoder)
    module = NormalisedNetwork(encoder.network, preprocessing.mean, preprocessing.std, settings.channels_last).eval()
    log.info("extract.backend=auto: comparing OpenVINO fp32 with PyTorch eager fp32 for %s on %d gallery images "
             "(once for this model and machine)", settings.model.name, CHECK_IMAGES)
    # the store's own description: the extraction that follows compiles the very conversion made here
    description = store_encoder_description(dataclasses.replace(settings, backend="openvino"))
    batch = sample_batch(settings, preprocessing, gallery)
    if len(batch) < 2:
        return None
    openvino = make_forward("openvino", "32-true", module, description, settings.cache_dir)
    with torch.inference_mode(), kept_freed_memory():  # eager as extraction runs it
        def eager(images):
            return module(images)

        rows = {"torch": unit_rows(eager(batch)), "openvino": unit_rows(openvino(batch))}
        timed = batch[:TIMED_IMAGES]
        seconds = {"torch": [], "openvino": []}
        for round_ in range(ROUNDS):
            for name, forward in (("torch", eager), ("openvino", openvino))[::1 if round_ % 2 == 0 else -1]:
                start = time.perf_counter()
                forward(timed)
                seconds[name].append(time.perf_counter() - start)
    cosine_min = float(np.min(np.sum(rows["torch"] * rows["openvino"], axis=1)))
    neighbours = same_neighbours(rows["torch"], rows["openvino"])
    speedup = min(seconds["torch"]) / min(seconds["openvino"])
    equal = cosine_min >= EQUAL_COSINE and neighbours
    faster = speedup >= FASTER_BY
    figures = (f"rows cosine min {cosine_min:.6f}, top-10 {'the same' if neighbours else 'differ'} over "
               f"{len(batch)} gallery images; {speedup:.2f}x eager's images/s")
    if equal and faster:
        backend, reason = "openvino", f"auto: OpenVINO fp32, the same rows as PyTorch eager fp32 and faster ({figures})"
    elif not equal:
        backend, reason = "torch", f"auto: PyTorch, OpenVINO fp32's rows are not eager's ({figures})"
    else:
        backend, reason = "torch", f"auto: PyTorch, OpenVINO fp32 is not {FASTER_BY}x faster ({figures})"
    log.info("extract.backend=%s: %s", backend, reason)
    return {"backend": backend, "reason": reason, "cosine_min": cosine_min, "same_top_10": neighbours,
            "speedup": speedup, "images": len(batch), "torch_seconds": seconds["torch"],
            "openvino_seconds": seconds["openvino"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
