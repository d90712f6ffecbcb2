"""The batch-1 latency probe: the model's forward on one image at a time, as extraction runs it."""
from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import torch

from imgret.embed.backends import precision_context
from imgret.embed.loop import EmbeddingModule
from imgret.embed.models import Encoder
from imgret.embed.options import ExtractSettings
from imgret.embed.resolve import resolve_precision
from imgret.errors import BadImage, DataUnavailable
from imgret.sources.base import ImageSet


def forward_latency_ms(encoder: Encoder, image_set: ImageSet, settings: ExtractSettings, device: str,
                       forward=None) -> float:
    """Median model-forward time at batch size 1 (the seed's measure) through the extraction's module, backend
    and precision: preprocessing excluded."""
    count = max(1, min(settings.latency_images, len(image_set)))
    preprocessing = encoder.preprocessing(settings.decoder)
    inputs = []
    for i in np.unique(np.linspace(0, len(image_set) - 1, count).astype(int)):
        with contextlib.suppress(BadImage):  # extraction reports unusable images; the probe only needs good ones
            image = preprocessing.load(image_set.paths[int(i)], settings.max_image_pixels)
            inputs.append(preprocessing.batch([image]).to(device))
    if not inputs:
        raise DataUnavailable(f"none of the {count} {image_set.split} images sampled for the latency probe could be "
                              "read: is this the right folder?")
    module = EmbeddingModule(encoder.network, preprocessing.mean, preprocessing.std, settings.channels_last,
                             forward).to(device).eval()
    times = []
    with torch.inference_mode(), precision_context(resolve_precision(settings, device) if forward is None else "32-true",
                                                   device):
        for x in inputs[: min(5, count)]:  # warm-up: first calls allocate and pick kernels
            module.embed(x)
        for x in inputs:
            start = time.perf_counter()
            module.embed(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
