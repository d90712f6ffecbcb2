"""What extraction can be asked for, light to import: the precisions, the decoders, the check of the extract
group (validate.py asks it before any work), and `ExtractSettings`, all that the extraction stage (and each of its
rank processes) reads: typed, frozen, made once by an entry point."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from imgret.errors import ConfigError, bad_value, check_bool, check_whole, whole
from imgret.options import Options, config_defaults
from imgret.sources.decode import DEFAULT_MAX_IMAGE_PIXELS

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "int8")  # int8: extract.backend=openvino
DECODERS = ("torchvision", "pil")  # imgret/embed/preprocess.py
DEFAULT_DECODER = DECODERS[0]
BACKENDS = ("auto", "torch", "openvino")  # imgret/embed/backends.py; auto: imgret/embed/backend_choice.py


def check_extract(extract, device: str) -> None:
    """The keys of the extract group (a run's `extract`), on this `device`."""
    check_whole("extract.latency_images", extract.latency_images, 1, " of images timed at batch 1")
    for key in ("channels_last", "progress"):
        check_bool(f"extract.{key}", extract.get(key, True))
    devices = extract.get("devices", 1)
    if devices != "auto" and not whole(devices, 1):
        raise bad_value("extract.devices", devices, "a whole number of processes or GPUs >= 1, or auto")
    check_whole("extract.num_nodes", extract.get("num_nodes", 1), 1, " of machines")
    if extract.get("precision", "auto") not in PRECISIONS:
        raise bad_value("extract.precision", extract.get("precision"), f"one of {', '.join(PRECISIONS)}")
    if extract.get("precision") == "16-mixed" and device != "cuda":
        raise bad_value("extract.precision", "16-mixed", "a precision this device runs: 16-mixed needs device=cuda; "
                        "on the CPU use bf16-mixed or 32-true")
    check_backend(extract.get("backend", "torch"), extract.get("precision", "auto"))
    if extract.get("decoder", DEFAULT_DECODER) not in DECODERS:
        raise bad_value("extract.decoder", extract.get("decoder"), f"one of {', '.join(DECODERS)}")
    strategy = extract.get("strategy", "auto")
    if strategy not in ("auto", "ddp"):
        from pytorch_lightning.strategies import StrategyRegistry

        if strategy not in StrategyRegistry.available_strategies():
            raise bad_value("extract.strategy", strategy, "auto, ddp, or another of Lightning's registered strategies")


def check_backend(backend: str, precision: str) -> None:
    """Before any work: the backend exists, is installed, and runs the precision asked for."""
    if backend not in BACKENDS:
        raise bad_value("extract.backend", backend, f"one of {', '.join(BACKENDS)}")
    reason = invalid_extract_combination(backend, precision)
    if reason:
        raise bad_value("extract.precision", precision, reason)
    if backend == "openvino" and precision == "16-mixed":
        raise bad_value("extract.precision", precision, "32-true, bf16-mixed, int8 or auto with extract.backend="
                        "openvino (CPU)")
    # OpenVINO is a dependency of imgret; NNCF, which quantizes to int8, is in the extra imgret[openvino]
    needed = (["openvino"] if backend == "openvino" or precision == "int8" else []) + \
        (["nncf"] if precision == "int8" else [])
    missing = [name for name in needed if not _importable(name)]
    if missing:
        what = f"extract.backend={backend}" + (" with extract.precision=int8" if precision == "int8" else "")
        raise ConfigError(f"{what}: {' and '.join(missing)} not installed; pip install "
                          "'openvino==2026.4.1' 'nncf==3.4.0' (or imgret[openvino])", key="extract.backend")


def invalid_extract_combination(backend: str, precision: str) -> str | None:
    """Why this backend does not run this precision (a sweep with skip_invalid=true skips such a point), or None."""
    if precision == "int8" and backend not in ("openvino", "auto"):
        return ("a precision of this backend: int8 runs on extract.backend=openvino (NNCF's post-training "
                "quantization); PyTorch eager runs 32-true or bf16-mixed")
    return None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


_RUN, _EXTRACT = config_defaults(), config_defaults().extract


@dataclass(frozen=True)
class ModelSettings:
    """A model (conf/model/<name>.yaml): what its family builds and with which weights. Its family reads it
    (imgret/embed/families); its name, architecture, weights and size key its stores."""
    name: str = ""
    family: str | None = None  # which library builds it (imgret/embed/families/<family>.py)
    arch: str = ""
    pretrained: bool = True  # the published weights (else random, seeded by `seed`)
    checkpoint: str | None = None  # a local state_dict instead
    image_size: int | None = None  # the input's side in pixels; None: the model's own
    weights: str = "DEFAULT"  # torchvision: which published weights `pretrained` loads
    pretrained_tag: str | None = None  # open_clip: which published weights `pretrained` loads
    bf16_pays: bool | None = None  # whether bf16 measured faster than fp32 (None: never measured)

    @classmethod
    def of(cls, section) -> "ModelSettings":
        """A model's config section (a DictConfig, a mapping, or ModelSettings): its keys, resolved; keys no model
        has are left out (a family reads only these)."""
        if isinstance(section, cls):
            return section
        values = Options.of(section)
        if values.get("bf16_pays") not in (True, False, None):
            raise bad_value("model.bf16_pays", values["bf16_pays"], "true or false (what `python -m imgret.bench "
                            "--parts precision` measured for this model), or null if nobody measured it")
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values})


@dataclass(frozen=True)
class ExtractSettings:
    """How images become an embedding store: the model (which its family reads) and the extraction's own
    settings. The defaults are conf/config.yaml's, read from it."""
    model: ModelSettings
    cache_dir: Path
    seed: int = _RUN.seed
    device: str = _RUN.device
    batch_size: int = _RUN.batch_size
    num_workers: int | str = _RUN.num_workers
    latency_images: int = _EXTRACT.latency_images
    channels_last: bool = _EXTRACT.channels_last
    decoder: str = _EXTRACT.decoder
    precision: str = _EXTRACT.precision
    backend: str = _EXTRACT.backend  # imgret.embed.backends: torch | openvino; auto: imgret.embed.backend_choice
    devices: int | str = _EXTRACT.devices
    num_nodes: int = _EXTRACT.num_nodes
    strategy: str = _EXTRACT.strategy
    progress: bool = _EXTRACT.progress
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # the data source's data.max_image_pixels
    skip_bad_images: bool = True  # the data source's data.on_bad_image == skip

    def __post_init__(self) -> None:  # a library caller's model section becomes ModelSettings here, once
        object.__setattr__(self, "model", ModelSettings.of(self.model))

    @classmethod
    def from_config(cls, cfg) -> "ExtractSettings":
        """From a run's composed config (an entry point's, once)."""
        extract, data = cfg.extract, cfg.data
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        return cls(model=ModelSettings.of(cfg.model), cache_dir=Path(str(cfg.paths.cache)), seed=int(cfg.seed),
                   device=str(cfg.device), batch_size=int(cfg.batch_size), num_workers=cfg.num_workers,
                   **{key: extract.get(key, defaults[key]) for key in (
                       "latency_images", "channels_last", "decoder", "precision", "backend", "devices", "num_nodes",
                       "strategy", "progress")},
                   max_image_pixels=int(data.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)),
                   skip_bad_images=data.get("on_bad_image", "skip") == "skip")

    def to_json(self) -> dict:
        """For a rank process: plain values (`from_json` reads them back)."""
        return {**dataclasses.asdict(self), "cache_dir": str(self.cache_dir)}

    @classmethod
    def from_json(cls, values: dict) -> "ExtractSettings":
        return cls(**{**values, "model": ModelSettings(**values["model"]), "cache_dir": Path(values["cache_dir"])})
