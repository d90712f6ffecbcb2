"""open_clip's image towers (`family: open_clip`): `model.arch` an open_clip model name and `model.pretrained_tag`
a tag published for it, with CLIP's own preprocessing (its mean and std, not ImageNet's). The text tower is never
built into the encoder: image retrieval uses the image tower alone."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from imgret.cache import verified_digest
from imgret.embed.families.base import Family, hub_file, offline_error, reachable, safetensors_first, weights_not_here
from imgret.errors import ConfigError, allowed, bad_value
from imgret.embed.options import ModelSettings


def pretrained_cfg(model: ModelSettings) -> dict:
    import open_clip

    if open_clip.get_model_config(model.arch) is None:
        raise bad_value("model.arch", model.arch, "an open_clip model name (see open_clip.list_models())")
    tag = model.pretrained_tag
    tags = open_clip.list_pretrained_tags_by_model(model.arch)
    if tag not in tags:
        raise bad_value("model.pretrained_tag", tag, f"a tag published for {model.arch}: one of {allowed(tags)}")
    return open_clip.get_pretrained_cfg(model.arch, tag)


def weights_file(published: dict) -> Path | None:
    """Where the published weights' file is (fetched now where it is not cached and can be), or None."""
    from open_clip.pretrained import HF_WEIGHTS_NAME, download_pretrained_from_url

    if published.get("hf_hub"):
        repo, filename = os.path.split(published["hf_hub"])  # "org/name/" means open_clip's default file
        return hub_file(repo, safetensors_first(filename or HF_WEIGHTS_NAME))
    url = published.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if url and not cached.is_file() and reachable(urlparse(url).hostname or ""):
        return Path(download_pretrained_from_url(url))  # checks the sha256 its address carries
    return cached if url and cached.is_file() else None


class OpenClip(Family):
    name = "open_clip"

    def preprocessing(self, model: ModelSettings) -> dict:
        """CLIP's own transform: resize the short side, centre crop, CLIP's mean and std."""
        import open_clip

        published = pretrained_cfg(model)
        native = open_clip.get_model_config(model.arch)["vision_cfg"]["image_size"]
        return {
            "size": model.image_size or native,
            "interpolation": published.get("interpolation", "bicubic"),
            "mean": list(published.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": list(published.get("std", open_clip.OPENAI_DATASET_STD)),
            "resize_mode": published.get("resize_mode", "shortest"),
        }

    def pretrained_id(self, model: ModelSettings) -> str:
        """The published tag and the sha256 of the file open_clip will load (the hub's cache, or open_clip's own
        download folder; downloaded first where it is not there and can be)."""
        file = weights_file(pretrained_cfg(model))
        if file is None:
            raise weights_not_here(model, "the Hugging Face hub's cache or open_clip's download folder")
        return f"pretrained:{model.arch}:{model.pretrained_tag}:{verified_digest(file)}"

    @functools.lru_cache(maxsize=32)
    def output_dim(self, arch: str) -> int:
        import open_clip

        return int(open_clip.get_model_config(arch)["embed_dim"])

    def build(self, model: ModelSettings, preprocessing: dict, trained: bool, checkpoint: Path | None):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        published = pretrained_cfg(model)
        try:
            clip = open_clip.create_model(
                model.arch,
                pretrained=model.pretrained_tag if trained else None,
                force_image_size=model.image_size,
                force_quick_gelu=bool(published.get("quick_gelu", False)),
            )
        except (OSError, RuntimeError) as error:
            raise offline_error(model, error) from error
        network = clip.visual  # the text tower is never used for image retrieval
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            if any(key.startswith("visual.") for key in state):
                state = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
            try:
                network.load_state_dict(state)
            except RuntimeError as error:
                raise ConfigError(f"model.checkpoint={model.checkpoint!r} does not fit {model.arch}'s image "
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
