"""Model stage: an image encoder and the preprocessing that belongs to it.

`describe_encoder` says everything that determines the vectors (architecture, weights, input size,
preprocessing) without building the model, so that a cached embedding store can be found and reused
without loading any weights. `build_encoder` builds the network and its transform from that description.
Each model family (timm, open_clip, ...) is one module of imgret/embed/families; nothing here names one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from imgret.cache import verified_digest
from imgret.embed.families import family_of
from imgret.embed.options import ModelSettings
from imgret.errors import bad_value

log = logging.getLogger(__name__)


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


def describe_encoder(model: ModelSettings, seed: int) -> dict:
    model = ModelSettings.of(model)
    family = family_of(model)
    image_size = model.image_size
    if image_size is not None and (not isinstance(image_size, int) or image_size < 16):
        raise bad_value("model.image_size", image_size, "a whole number of pixels >= 16, or null for the model's own")
    preprocessing = family.preprocessing(model)
    return {
        "name": model.name,
        "family": family.name,
        "arch": model.arch,
        "weights": _weights_id(model, seed),
        "image_size": preprocessing["size"],
        "preprocessing": preprocessing,
    }


def output_dim(model: ModelSettings) -> int:
    """The embedding dimension the model produces, known without building it (for checks before any work)."""
    model = ModelSettings.of(model)
    return family_of(model).output_dim(model.arch)


def build_encoder(model: ModelSettings, seed: int) -> Encoder:
    model = ModelSettings.of(model)
    description = describe_encoder(model, seed)
    torch.manual_seed(seed)  # random-init weights are part of the cache key, so make them reproducible
    checkpoint = model.checkpoint
    trained = bool(model.pretrained) and not checkpoint
    network, transform = family_of(model).build(model, description["preprocessing"], trained,
                                                    Path(checkpoint).expanduser() if checkpoint else None)
    network.eval().requires_grad_(False)
    return Encoder(model.name, network, transform, description)


def _weights_id(model: ModelSettings, seed: int) -> str:
    checkpoint = model.checkpoint
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise bad_value("model.checkpoint", checkpoint, "an existing weights file (a state_dict); this one does not exist")
        return f"checkpoint:{verified_digest(path)}"  # the whole sha256: the weights known by their bytes
    if model.pretrained:
        return family_of(model).pretrained_id(model)
    return f"random:seed{seed}:torch{torch.__version__.split('+')[0]}"
