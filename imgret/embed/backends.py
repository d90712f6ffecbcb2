"""Where the model's forward runs (`extract.backend`) and at which precision: PyTorch eager (fp32, or bf16 by
autocast), or OpenVINO (fp32, bf16, or int8 after post-training static quantization by NNCF).

Why OpenVINO with NNCF for int8: one maintained toolchain that takes the PyTorch module as it is (no ONNX export
step), calibrates on a sample of the gallery, and runs int8 convolutions and matrix products on AVX512-VNNI/AMX;
PyTorch's own eager int8 (torch.ao.quantization) is deprecated in favour of export-based flows. `python -m
imgret.bench --parts precision` measures each backend and precision against PyTorch eager fp32.

Every backend starts from uint8 (B, 3, H, W) batches, as the loader makes them, and the same normalisation
(`NormalisedNetwork`), so rows differ only by the backend's arithmetic. A converted (and quantized) model is
cached under paths.cache/models, keyed by what decides it: the store reuses the very model that embedded its
rows, and the web demo embeds uploads with it too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from imgret.cache import Unreadable, load_checked, save_checked
from imgret.embed.precision import BF16_FLAGS, cpu_flags
from imgret.errors import BadImage, ConfigError

log = logging.getLogger(__name__)

# Images of the gallery NNCF calibrates int8 on (evenly spaced over it: every class of a sorted listing);
# NNCF's own default subset is 300.
CALIBRATION_IMAGES = 300
OPENVINO_PRECISION = {"32-true": "f32", "bf16-mixed": "bf16", "int8": "f32"}  # int8: the layers left in float, f32


class NormalisedNetwork(nn.Module):
    """uint8 (B, 3, H, W) images in, features out (not yet L2-normalised): ToTensor then Normalize, then the
    network. The one definition every backend runs (and converts)."""

    def __init__(self, network: nn.Module, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False):
        super().__init__()
        # oneDNN's convolutions run faster on NHWC tensors (measured by `python -m imgret.bench`)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network = network.to(memory_format=self.memory_format)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # the same operations, in the same order, as ToTensor then Normalize on each image
        x = images.to(dtype=torch.float32, memory_format=self.memory_format).div_(255).sub_(self.mean).div_(self.std)
        return self.network(x)


def precision_context(precision: str, device: str):
    """What Lightning's `precision` does around a PyTorch forward, for forwards outside its Trainer."""
    if precision == "bf16-mixed":
        return torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def calibration_indices(count: int, images: int = CALIBRATION_IMAGES) -> np.ndarray:
    return np.unique(np.linspace(0, count - 1, min(images, count)).astype(int)) if count else np.empty(0, int)


class OpenVinoForward:
    """A `NormalisedNetwork` converted to OpenVINO (int8: quantized by NNCF on `calibration` batches), compiled
    for the CPU at `precision` on `threads` threads. Called like the module: a uint8 batch in, features out.
    `model_file`: where the converted model is cached (a rank process of the same extraction compiles that file)."""

    def __init__(self, model, precision: str, threads: int, model_file: Path | None = None):
        import openvino as ov

        if isinstance(model, (str, Path)):
            model = ov.Core().read_model(model)
        self.precision, self.model_file = precision, model_file
        hint = OPENVINO_PRECISION[precision]
        if hint == "bf16" and not cpu_flags().intersection(BF16_FLAGS):
            # OpenVINO reads the CPU itself and gives f32 for a bf16 hint where it has no bf16 instructions; under
            # oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) it still sees them and compiles kernels its capped oneDNN
            # cannot run (a crash), so imgret asks for what OpenVINO would choose on such a CPU
            hint = "f32"
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads)}
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.output = self.compiled.output(0)
        # what OpenVINO compiled the float layers at: a bf16 hint on a CPU without bf16 instructions gives f32
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(images.cpu().numpy())
        return torch.from_numpy(np.array(self.compiled(pixels)[self.output], dtype=np.float32))


def openvino_model(module: NormalisedNetwork, image_size: int, cache_file: Path | None):
    """The float OpenVINO model of `module`, read from `cache_file` when it is there and matches its recorded
    checksums, else converted and saved there (imgret's checked cache files: a damaged one is moved aside and made
    again). fp32 and bf16 compile it with their own hint; int8 quantizes it (`quantized_model`)."""
    import openvino as ov

    def convert():
        example = torch.zeros((1, 3, image_size, image_size), dtype=torch.uint8)
        with torch.inference_mode(False), torch.no_grad():
            return ov.convert_model(module.eval(), example_input=example,
                                    input=[(ov.PartialShape([-1, 3, image_size, image_size]), ov.Type.u8)])

    return _cached_model(cache_file, convert, "float")


def quantized_model(model, cache_file: Path | None, calibration: Callable[[], Iterable[torch.Tensor]] | None):
    """`model` (float) quantized to int8 by NNCF on the batches `calibration` yields, cached like the float one."""
    def quantize():
        import nncf

        batches = [batch.numpy() for batch in (calibration() if calibration else [])]
        if not batches:
            raise ConfigError("extract.precision=int8 needs gallery images to calibrate on, and none could be read")
        log.info("quantizing the model to int8 (NNCF), calibrated on %d gallery images",
                 sum(len(batch) for batch in batches))
        return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))

    return _cached_model(cache_file, quantize, "int8")


def _cached_model(cache_file: Path | None, make: Callable, kind: str):
    import openvino as ov

    if cache_file is not None:
        found = load_checked(cache_file, _read_model, {"weights": ".bin"})  # verified: size and sha256 of both
        if found is not None:
            return found
    model = make()
    if cache_file is not None:
        weights = cache_file.with_suffix(".bin")

        def write(partial: Path) -> None:  # the .xml names its weights by its own stem: they go in place first
            ov.save_model(model, partial, compress_to_fp16=False)
            os.replace(partial.with_suffix(".bin"), weights)

        save_checked(cache_file, write, {"backend": "openvino", "precision": kind}, {"weights": weights})
    return model


def _read_model(path: Path, meta: dict):
    import openvino as ov

    try:
        return ov.Core().read_model(path)
    except RuntimeError as error:
        raise Unreadable(f"OpenVINO cannot read it: {error}") from error


def model_cache_file(cache_dir: Path, description: dict, calibration_id: str | None) -> Path:
    key = json.dumps({"encoder": description, "calibration": calibration_id}, sort_keys=True)
    return Path(cache_dir) / "models" / f"{description.get('name', 'model')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.xml"


def calibration_batches(image_set, preprocessing, max_pixels: int, batch_size: int = 32):
    """`CALIBRATION_IMAGES` gallery images spread over the set, as uint8 batches at the model's size."""
    def batches():
        loaded = []
        for index in calibration_indices(len(image_set)):
            with contextlib.suppress(BadImage):
                loaded.append(preprocessing.load(image_set.paths[int(index)], max_pixels))
        for start in range(0, len(loaded), batch_size):
            yield preprocessing.batch(loaded[start:start + batch_size])
    return batches


def make_forward(backend: str, precision: str, module: NormalisedNetwork, description: dict, cache_dir: Path | None,
                 calibration_set=None, preprocessing=None, max_pixels: int | None = None,
                 threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The forward a backend runs instead of PyTorch eager's (None: PyTorch eager, with autocast for bf16).
    int8 calibrates on `calibration_set` (the gallery's ImageSet): the gallery's and the queries' rows, and
    the demo's uploads, then come from one quantized model."""
    if backend == "torch":
        return None

    def cache_file(converted: str, calibration_id: str | None = None) -> Path | None:
        return None if cache_dir is None else model_cache_file(
            cache_dir, {**description, "backend": backend, "precision": converted}, calibration_id)

    # fp32 and bf16 are hints to one float model's compilation: they share its conversion, which int8 quantizes
    model = openvino_model(module, int(description["image_size"]), cache_file("float"))
    if precision == "int8":
        if calibration_set is None:
            raise ConfigError("extract.precision=int8 needs the gallery to calibrate on")
        calibration_id = f"{calibration_set.source_id}:{len(calibration_set)}:{CALIBRATION_IMAGES}"
        model = quantized_model(model, cache_file("int8", calibration_id),
                                calibration_batches(calibration_set, preprocessing, max_pixels))
    return OpenVinoForward(model, precision, threads or torch.get_num_threads() or os.cpu_count() or 1,
                           cache_file("int8", calibration_id) if precision == "int8" else cache_file("float"))
