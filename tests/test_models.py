import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from conftest import PROJECT_ROOT
from imgret.errors import ConfigError
from imgret.embed.models import build_encoder, describe_encoder

IMAGENET_MEAN = [0.485, 0.456, 0.406]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.mark.parametrize("model, mean, dim", [("resnet18", IMAGENET_MEAN, 512), ("mobilenet", IMAGENET_MEAN, 1280),
                                              ("clip", CLIP_MEAN, 512)])
def test_each_model_has_its_own_preprocessing_and_feature_size(make_cfg, model, mean, dim):
    cfg = make_cfg(f"model={model}", "model.pretrained=false", "model.image_size=64")
    encoder = build_encoder(cfg.model, seed=0)
    prep = encoder.description["preprocessing"]
    assert prep["mean"] == pytest.approx(mean)
    if model == "clip":
        assert prep["std"] == pytest.approx(CLIP_STD)
    # the transform that runs is the one described (it keys the cache)
    normalize = encoder.transform.transforms[-1]
    assert [float(v) for v in normalize.mean] == pytest.approx(mean)
    image = Image.new("RGB", (100, 80), (200, 30, 90))
    x = encoder.transform(image)
    assert tuple(x.shape) == (3, 64, 64)
    with torch.inference_mode():
        features = encoder.network(x.unsqueeze(0))
    assert tuple(features.shape) == (1, dim)


def test_native_size_when_image_size_is_null(make_cfg):
    assert describe_encoder(make_cfg("model=resnet18", "model.pretrained=false").model, 0)["image_size"] == 224
    assert describe_encoder(make_cfg("model=clip", "model.pretrained=false").model, 0)["image_size"] == 224


def test_description_changes_with_what_changes_the_vectors(make_cfg, tmp_path):
    base = describe_encoder(make_cfg("model.pretrained=false").model, 0)
    assert base != describe_encoder(make_cfg("model.pretrained=false", "model.image_size=64").model, 0)
    assert base != describe_encoder(make_cfg("model.pretrained=false").model, 1)  # random init depends on seed
    path = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    assert base != describe_encoder(make_cfg(f"model.checkpoint={path}").model, 0)


def hub_cache_holding(cache: Path, repo: str, filename: str, state: dict) -> Path:
    """A Hugging Face hub cache (its own layout: refs/main names a snapshot) holding one weights file."""
    from safetensors.torch import save_file

    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    save_file(state, folder / "snapshots" / revision / filename)
    return folder / "snapshots" / revision / filename


@pytest.mark.slow
def test_hub_weights_are_known_by_their_bytes_and_loaded_from_the_hub_s_cache_offline(tmp_path):
    """timm's published weights found in the hub's cache, offline: the identity (the store's key, the run's tag)
    carries the file's sha256, and the network timm builds from it holds the file's tensors; another file under
    the same name is another identity."""
    import hashlib

    torch.manual_seed(5)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    file = hub_cache_holding(tmp_path / "hub", "timm/resnet18.a1_in1k", "model.safetensors", state)
    code = (
        "import sys, torch; from hydra import compose, initialize_config_dir\n"
        "from imgret.embed.models import build_encoder\n"
        f"with initialize_config_dir(config_dir='{PROJECT_ROOT / 'conf'}', version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['model=resnet18', 'model.pretrained=true'])\n"
        "encoder = build_encoder(cfg.model, 0)\n"
        "print(encoder.description['weights']); print(float(encoder.network.conv1.weight.double().sum()))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}

    def identity_and_checksum():
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()[-2:]

    identity, checksum = identity_and_checksum()
    assert identity == f"pretrained:timm/resnet18.a1_in1k:sha256:{hashlib.sha256(file.read_bytes()).hexdigest()}"
    assert float(checksum) == pytest.approx(float(state["conv1.weight"].double().sum()), abs=1e-9)
    state["conv1.weight"] = state["conv1.weight"] + 1  # altered weights under the same name
    from safetensors.torch import save_file

    save_file(state, file)
    assert identity_and_checksum()[0] != identity


def test_checkpoint_file_loads_the_weights(make_cfg, tmp_path):
    trained = timm.create_model("resnet18", pretrained=False)  # with its classifier head, as people save it
    torch.nn.init.constant_(trained.conv1.weight, 0.01)
    path = tmp_path / "resnet18.pt"
    torch.save(trained.state_dict(), path)
    encoder = build_encoder(make_cfg(f"model.checkpoint={path}").model, seed=0)
    assert torch.equal(encoder.network.conv1.weight, trained.conv1.weight)
    assert encoder.description["weights"].startswith("checkpoint:sha256:")


def test_checkpoint_of_another_model_is_refused(make_cfg, tmp_path):
    path = tmp_path / "mobilenet.pt"
    torch.save(timm.create_model("mobilenetv2_100", pretrained=False).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit"):
        build_encoder(make_cfg(f"model.checkpoint={path}").model, seed=0)


def test_missing_checkpoint_names_the_setting(make_cfg):
    with pytest.raises(ConfigError, match="^model.checkpoint=/no/weights.pt: an existing weights file"):
        describe_encoder(make_cfg("model.checkpoint=/no/weights.pt").model, 0)


@pytest.mark.parametrize("model", ["resnet18", "clip"])
def test_offline_pretrained_weights_fail_with_what_to_do(model):
    code = (
        "from omegaconf import OmegaConf; from hydra import compose, initialize_config_dir\n"
        "from imgret.embed.models import build_encoder\n"
        f"with initialize_config_dir(config_dir='{PROJECT_ROOT / 'conf'}', version_base='1.3'):\n"
        f"    cfg = compose('config', overrides=['model={model}'])\n"
        "build_encoder(cfg.model, 0)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # what an offline user sets; without it the hub retries for ~45 s
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ConfigError: model.pretrained=true: weights this machine has" in result.stderr  # before any build
    assert "model.pretrained=false" in result.stderr and "model.checkpoint=PATH" in result.stderr
