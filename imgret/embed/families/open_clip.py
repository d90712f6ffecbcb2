"""open_clip's image towers (`family: open_clip`): `model.arch` an open_clip model name and `model.pretrained_tag`
a tag published for it, with CLIP's own preprocessing (its mean and std, not ImageNet's). The text tower is never
built into the encoder: image retrieval uses the image tower alone."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from imgret.embed.families.base import Family, offline_error
from imgret.errors import ConfigError, allowed, bad_value


def pretrained_cfg(model_cfg) -> dict:
    import open_clip

    if open_clip.get_model_config(model_cfg.arch) is None:
        raise bad_value("model.arch", model_cfg.arch, "an open_clip model name (see open_clip.list_models())")
    tag = model_cfg.get("pretrained_tag")
    tags = open_clip.list_pretrained_tags_by_model(model_cfg.arch)
    if tag not in tags:
        raise bad_value("model.pretrained_tag", tag, f"a tag published for {model_cfg.arch}: one of {allowed(tags)}")
    return open_clip.get_pretrained_cfg(model_cfg.arch, tag)


class OpenClip(Family):
    name = "open_clip"

    def preprocessing(self, model_cfg) -> dict:
        """CLIP's own transform: resize the short side, centre crop, CLIP's mean and std."""
        import open_clip

        published = pretrained_cfg(model_cfg)
        native = open_clip.get_model_config(model_cfg.arch)["vision_cfg"]["image_size"]
        return {
            "size": model_cfg.get("image_size") or native,
            "interpolation": published.get("interpolation", "bicubic"),
            "mean": list(published.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": list(published.get("std", open_clip.OPENAI_DATASET_STD)),
            "resize_mode": published.get("resize_mode", "shortest"),
        }

    def pretrained_id(self, model_cfg) -> str:
        return f"pretrained:{model_cfg.arch}:{model_cfg.pretrained_tag}"

    @functools.lru_cache(maxsize=32)
    def output_dim(self, arch: str) -> int:
        import open_clip

        return int(open_clip.get_model_config(arch)["embed_dim"])

    def build(self, model_cfg, preprocessing: dict, trained: bool, checkpoint: Path | None):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        published = pretrained_cfg(model_cfg)
        try:
            model = open_clip.create_model(
                model_cfg.arch,
                pretrained=model_cfg.pretrained_tag if trained else None,
                force_image_size=model_cfg.get("image_size"),
                force_quick_gelu=bool(published.get("quick_gelu", False)),
            )
        except (OSError, RuntimeError) as error:
            raise offline_error(model_cfg, error) from error
        network = model.visual  # the text tower is never used for image retrieval
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            if any(key.startswith("visual.") for key in state):
                state = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
            try:
                network.load_state_dict(state)
            except RuntimeError as error:
                raise ConfigError(f"model.checkpoint={model_cfg.checkpoint!r} does not fit {model_cfg.arch}'s image "
                                  f"tower: {error}")
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


FAMILIES = (OpenClip(),)
