"""What an extraction's settings resolve to on this machine: the device, the processes, the loader processes, the
precision (and why), and the description that keys its store. Small pure-ish functions, below the extraction."""
from __future__ import annotations

import os

import torch

from imgret.embed.models import describe_encoder
from imgret.embed.options import ExtractSettings
from imgret.embed.precision import PrecisionChoice, choose_precision
from imgret.errors import ConfigError


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use device=cpu or device=auto")
    return device


def resolve_num_workers(num_workers, device: str) -> int:
    """`auto`: none on the CPU, where loader processes only take cores from the model (measured by the
    benchmark on 2 cores; the loading then runs between batches), up to 8 beside a GPU, which waits on them."""
    if num_workers == "auto":
        return min(8, os.cpu_count() or 1) if device == "cuda" else 0
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r} must be 'auto' or a whole number >= 0")
    return num_workers


def resolve_devices(devices, device: str) -> int:
    if devices == "auto":
        return torch.cuda.device_count() if device == "cuda" else 1
    return int(devices)


def precision_choice(settings: ExtractSettings, device: str) -> PrecisionChoice:
    """The precision extraction runs at, and why (imgret.embed.precision: the CPU's flags and the model's
    `bf16_pays`)."""
    return choose_precision(settings.precision, device, settings.model.bf16_pays)


def resolve_precision(settings: ExtractSettings, device: str) -> str:
    return precision_choice(settings, device).precision


def store_encoder_description(settings: ExtractSettings) -> dict:
    """The encoder's description, the decoder (its pixels differ), and the extraction precision whenever it
    changes the vectors."""
    if settings.backend == "auto":
        raise ValueError("extract.backend=auto is resolved (imgret.embed.backend_choice) before a store is keyed")
    description = {**describe_encoder(settings.model, settings.seed), "decoder": settings.decoder}
    precision = resolve_precision(settings, resolve_device(settings.device))
    if settings.backend != "torch":
        description["backend"] = settings.backend
    return description if precision == "32-true" else {**description, "precision": precision}
