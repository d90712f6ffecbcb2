"""The torchvision decoder against the reference (each model's own PIL transform), on real Tiny-ImageNet JPEGs:
the same decoded pixels, resize and crop within 2 levels, the same refusals of unusable files."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from conftest import require_real_archive
from imgret.embed.options import ExtractSettings
from imgret.embed.models import build_encoder
from imgret.embed.preprocess import check_tensor_preprocessing
from imgret.errors import BadImage, ConfigError
from imgret.sources.decode import jpeg_size, open_image, open_pixels


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """40 real JPEGs from the archive (some greyscale), and the same picture saved greyscale, CMYK, progressive,
    with an EXIF block before its frame header, and as a PNG."""
    archive = require_real_archive()
    folder = tmp_path_factory.mktemp("jpegs")
    with zipfile.ZipFile(archive) as real:
        names = [n for n in real.namelist() if n.endswith(".JPEG") and "/train/" in n][:4000:100]
        paths = []
        for number, name in enumerate(names):
            path = folder / f"{number}.JPEG"
            path.write_bytes(real.read(name))
            paths.append(str(path))
    picture = Image.open(paths[0]).convert("RGB")
    exif = Image.Exif()
    exif[0x010E] = "x" * 2000  # ImageDescription: a long APP1 segment to walk past
    variants = {"grey.jpg": (picture.convert("L"), {}), "cmyk.jpg": (picture.convert("CMYK"), {}),
                "progressive.jpg": (picture, {"progressive": True}), "exif.jpg": (picture, {"exif": exif}),
                "large.jpg": (picture.resize((301, 217)), {}), "picture.png": (picture, {})}
    for name, (image, options) in variants.items():
        image.save(folder / name, **options)
        paths.append(str(folder / name))
    return paths


def test_torchvision_decodes_every_kind_of_jpeg_to_pillows_pixels(jpegs):
    for path in jpegs:
        data = open(path, "rb").read()
        with Image.open(path) as image:
            size = image.size
        assert jpeg_size(data) == (None if path.endswith(".png") else size), path
        assert torch.equal(open_pixels(path), pil_to_tensor(open_image(path))), path


def outcome(open_as_tensor):
    """The pixels a decoder gives, or its refusal."""
    try:
        return open_as_tensor()
    except BadImage as error:
        return error.kind, error.reason


def test_damaged_files_are_refused_or_accepted_as_pillow_does(jpegs, tmp_path):
    whole = open(jpegs[0], "rb").read()
    files = {"truncated.jpg": whole[: len(whole) // 2], "empty.jpg": b"", "text.jpg": b"not an image at all",
             "scrambled.jpg": whole[:300] + bytes(200) + whole[500:]}  # libjpeg-turbo refuses it; Pillow does not
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    refused = 0
    for path in [str(tmp_path / name) for name in files] + [str(tmp_path / "missing.jpg")]:
        reference = outcome(lambda: pil_to_tensor(open_image(path)))
        decoded = outcome(lambda: open_pixels(path))
        if isinstance(reference, tuple):
            refused += 1
            assert decoded == reference, path
        else:
            assert torch.equal(decoded, reference), path
    assert refused == 4


def test_a_jpeg_over_the_pixel_limit_is_refused_from_its_header_before_decoding(jpegs, monkeypatch):
    import imgret.sources.decode

    def decode_jpeg_rgb(*args, **kwargs):
        raise AssertionError("decoded a JPEG over data.max_image_pixels")

    monkeypatch.setattr(imgret.sources.decode, "decode_jpeg_rgb", decode_jpeg_rgb)
    with pytest.raises(BadImage) as refused:
        open_pixels(jpegs[0], max_pixels=64 * 64 - 1)
    assert refused.value.kind == "too_many_pixels" and "64x64 pixels" in refused.value.reason


@pytest.mark.parametrize("model", [
    {"name": "resnet18", "family": "timm", "arch": "resnet18", "image_size": 64},
    {"name": "mobilenet", "family": "timm", "arch": "mobilenetv2_100", "image_size": 64},
    {"name": "clip", "family": "open_clip", "arch": "ViT-B-32", "pretrained_tag": "openai", "image_size": 160},
])
def test_the_tensor_resize_and_crop_stay_within_two_levels_of_the_models_own(jpegs, model):
    from omegaconf import OmegaConf

    encoder = build_encoder(OmegaConf.create({**model, "pretrained": False}), 0)
    reference, candidate = encoder.preprocessing("pil"), encoder.preprocessing("torchvision")
    expected = reference.batch([reference.load(path, 10**8) for path in jpegs]).int()
    loaded = [candidate.load(path, 10**8) for path in jpegs]  # two sizes: 64x64 and the 301x217 one
    resized = candidate.batch(loaded).int()
    assert resized.shape == expected.shape == (len(jpegs), 3, model["image_size"], model["image_size"])
    difference = (resized - expected).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.02
    assert not torch.equal(resized, expected)  # the torch resize is its own implementation
    # resized together (same size) or alone, an image comes out the same; an upload (a PIL image) too
    assert torch.equal(candidate.batch(loaded[-2:-1])[0], resized[-2])
    assert torch.equal(candidate.batch([candidate.from_image(Image.open(jpegs[3]))])[0], resized[3])


def test_a_model_whose_crop_the_tensors_cannot_do_asks_for_the_pil_decoder():
    check_tensor_preprocessing({"crop_mode": "center"})
    check_tensor_preprocessing({"resize_mode": "shortest"})
    with pytest.raises(ConfigError, match=r"^extract.decoder=torchvision: .*crop_mode=border.*extract.decoder=pil"):
        check_tensor_preprocessing({"crop_mode": "border"})


def test_the_decoder_is_part_of_the_stores_key(make_cfg):
    from imgret.embed.extract import ensure_embeddings
    from imgret.sources.registry import load_splits
    from conftest import SYNTHETIC_FAST

    overrides = (*SYNTHETIC_FAST, "data.gallery_per_class=2", "data.query_per_class=1")
    first = ensure_embeddings(load_splits(make_cfg(*overrides).data), ExtractSettings.from_config(make_cfg(*overrides)))
    again = make_cfg(*overrides, "extract.decoder=pil")
    second = ensure_embeddings(load_splits(again.data), ExtractSettings.from_config(again))
    assert second.extracted == ("gallery", "queries") and second.gallery.path != first.gallery.path
    assert np.sum(first.gallery.vectors * second.gallery.vectors, axis=1).min() > 0.999


def test_a_large_image_is_resized_as_soon_as_it_is_decoded_to_the_same_pixels(tmp_path):
    """Extraction's bound on decoded pixels in flight: a loader resizes a large image at once (only small images
    wait in its batches), and its row's pixels are exactly those of the batch resize of the full decode."""
    from PIL import Image

    from imgret.embed.models import build_encoder
    from imgret.options import Options
    from imgret.sources.decode import open_pixels

    encoder = build_encoder(Options(name="resnet18", family="timm", arch="resnet18", pretrained=False,
                                    checkpoint=None, image_size=None), 0)
    preprocessing = encoder.preprocessing("torchvision")
    assert preprocessing.needed_side == 235  # timm's resnet18: resize to 224 / 0.95, crop 224
    big = tmp_path / "big.jpg"
    Image.radial_gradient("L").resize((2400, 1800)).convert("RGB").save(big, quality=92)
    loaded = preprocessing.load(str(big), 10_000_000)
    assert tuple(loaded.shape) == (3, 235, 313)  # resized in the loader, not held at 2400 x 1800
    full = open_pixels(str(big), 10_000_000)
    assert torch.equal(preprocessing.batch([loaded]), preprocessing.batch([full]))
    small = tmp_path / "small.jpg"
    Image.radial_gradient("L").resize((300, 260)).convert("RGB").save(small)
    assert tuple(preprocessing.load(str(small), 10_000_000).shape) == (3, 260, 300)  # as decoded: batched later


def thin_png(path, width: int, height: int = 1):
    Image.new("RGB", (width, height), (30, 120, 200)).save(path)  # a few hundred bytes on disk
    return path


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_a_thin_image_is_refused_from_its_header_before_the_models_resize_makes_it_huge(tmp_path, decoder):
    """An 8,000 x 1 image resized to a 235-pixel shorter side would be 235 x 1,880,000 pixels (1.3 GB as uint8):
    refused from its header, whichever decoder, and so is one whose resize output alone is over the pixel limit."""
    from imgret.options import Options
    from imgret.sources.decode import size_refusal, work_pixels

    encoder = build_encoder(Options(name="resnet18", family="timm", arch="resnet18", pretrained=False,
                                    checkpoint=None, image_size=None), 0)
    preprocessing = encoder.preprocessing(decoder)
    for name, size in (("thin.png", (8000, 1)), ("tall.jpg", (1, 8000))):
        path = tmp_path / name
        Image.new("RGB", size, (30, 120, 200)).save(path)
        with pytest.raises(BadImage, match="aspect ratio over 100:1") as refused:
            preprocessing.load(str(path), 10_000_000)
        assert refused.value.kind == "bad_shape"
    # within the ratio, but its resize to the model's side is over the limit (decoded, it is under it)
    wide = thin_png(tmp_path / "wide.png", 9000, 100)
    assert work_pixels(9000, 100, 235) == 235 * 21150 > 1_000_000 > 9000 * 100
    with pytest.raises(BadImage, match=r"9000x100 pixels resize to 4,970,250 pixels for the model's 235-pixel side, "
                                       r"over data.max_image_pixels=1000000") as refused:
        preprocessing.load(str(wide), 1_000_000)
    assert refused.value.kind == "too_many_pixels"
    assert size_refusal("ok", 300, 200, 1_000_000, side=235) is None  # an ordinary photo is untouched
    assert tuple(preprocessing.batch([preprocessing.load(str(wide), 10_000_000)]).shape) == (1, 3, 224, 224)


@pytest.mark.slow
def test_a_folder_with_a_thin_image_counts_it_as_a_bad_image(make_cfg, tmp_path):
    from conftest import write_images
    from imgret.run import run_tracked

    images = write_images(tmp_path / "images", per_class=8)
    thin_png(images / "a" / "thin.png", 20_000)
    cfg = make_cfg("data=folder", f"data.gallery_dir={images}", "data.query_fraction=0.2", "model.pretrained=false",
                   "model.image_size=32", "method=flat", "k=3")
    metrics = run_tracked(cfg)
    assert metrics["bad_images"] == 1 and metrics["gallery_size"] + metrics["query_size"] == 2 * 8
