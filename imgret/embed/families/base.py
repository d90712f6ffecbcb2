"""What a model family is (`Family`) and what families share: the offline refusal, the hub check, and loading a
local state_dict into a headless network."""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from imgret.errors import ConfigError, WeightsUnavailable
from imgret.embed.options import ModelSettings


class Family:
    """One library's models. Each method takes the model's config section (`model.*`)."""

    name: str  # what `model.family` says

    def preprocessing(self, model: ModelSettings) -> dict:
        """Everything about the input that decides the vectors (size, interpolation, mean, std, crop), as plain
        values, known without building the network; its "size" is the input's side in pixels."""
        raise NotImplementedError

    def pretrained_id(self, model: ModelSettings) -> str:
        """Which published weights `pretrained: true` loads, as part of the store's key (checked: an unknown
        architecture or tag, or weights that cannot be had offline, are refused here in one line)."""
        raise NotImplementedError

    def output_dim(self, arch: str) -> int:
        """The embedding dimension, known without building the network or loading weights."""
        raise NotImplementedError

    def build(self, model: ModelSettings, preprocessing: dict, trained: bool, checkpoint: Path | None) -> tuple[nn.Module, Callable]:
        """The headless network ((B, 3, H, W) float -> (B, D) features) and its eval transform (PIL image ->
        normalised tensor): with its published weights (`trained`), a local state_dict (`checkpoint`), or random
        weights (the caller seeds torch)."""
        raise NotImplementedError


def offline_error(model: ModelSettings, error: Exception) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"could not load the pretrained weights of model={model.name} ({model.arch}): {error}. "
        "Offline? Use model.pretrained=false for random weights, or model.checkpoint=PATH for a local "
        "weights file; with HF_HUB_OFFLINE=1 the hub fails at once instead of retrying."
    )


@functools.lru_cache(maxsize=8)
def reachable(host: str, seconds: float = 3.0) -> bool:
    """Whether `host` answers on HTTPS's port at all (asked once per process)."""
    try:
        with socket.create_connection((host, 443), timeout=seconds):
            return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all (HF_HUB_OFFLINE=1 says no without asking)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    return reachable("huggingface.co")


def hub_file(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of `filenames` in the Hugging Face hub's cache for `repo_id`; where none is cached and the hub
    answers, the first it serves, downloaded now (its bytes are known before any run); None otherwise."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    for name in filenames:
        cached = try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str):
            return Path(cached)
    if not hub_reachable():
        return None
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name))
        except EntryNotFoundError:
            continue
    return None


def safetensors_first(filename: str) -> tuple[str, ...]:
    """A weights file's name with the .safetensors copy the libraries load instead where the hub has one first."""
    if filename.endswith(".bin"):
        safe = "model.safetensors" if filename == "pytorch_model.bin" else \
            "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else filename[:-4] + ".safetensors"
        return safe, filename
    return (filename,)


def weights_not_here(model: ModelSettings, where: str) -> ConfigError:
    """The one line for trained weights that this machine neither has nor can download."""
    return ConfigError(f"model.pretrained=true: weights this machine has: model={model.name}'s trained weights "
                       f"are not in {where} and cannot be downloaded from here; use model.pretrained=false for random "
                       "weights, or model.checkpoint=PATH for a local weights file", key="model.pretrained")


def load_features_checkpoint(network: nn.Module, path: Path, head_prefix: str | None) -> None:
    """Load a state_dict into a headless network; the classifier head's weights (keys under `head_prefix`) may be
    present and are left out."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    expected = set(network.state_dict())
    unexpected = [k for k in state if k not in expected and not (head_prefix and k.startswith(head_prefix))]
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise ConfigError(
            f"model.checkpoint={str(path)!r} does not fit {type(network).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    network.load_state_dict({k: v for k, v in state.items() if k in expected})
