"""extract.backend=openvino beside PyTorch eager: fp32 rows within cosine 0.9999 of eager's, int8 quantized on the
gallery (one cached model embeds the gallery, the queries and the demo's uploads), each its own store; and the
one-line refusals of what a backend does not run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from imgret.embed.extract import ensure_embeddings
from imgret.embed.options import ExtractSettings
from imgret.errors import ConfigError
from imgret.sources.registry import load_splits

SMALL = ("data=synthetic", "model.pretrained=false", "model.image_size=32", "data.num_classes=5",
         "data.gallery_per_class=13", "data.query_per_class=3", "batch_size=8")


def stores(make_cfg, *overrides):
    cfg = make_cfg(*SMALL, *overrides)
    settings = ExtractSettings.from_config(cfg)
    splits = load_splits(cfg.data, cfg.seed)
    return ensure_embeddings(splits, settings), settings, splits


def cosine(a, b) -> np.ndarray:
    return (np.asarray(a.vectors) * np.asarray(b.vectors)).sum(axis=1)


@pytest.mark.slow  # converts a model to OpenVINO: about 15 s
def test_openvino_fp32_rows_are_eager_fp32_rows(make_cfg):
    eager, _, _ = stores(make_cfg, "extract.precision=32-true")
    openvino, _, _ = stores(make_cfg, "extract.precision=32-true", "extract.backend=openvino")
    assert openvino.gallery.path != eager.gallery.path  # the backend is part of the store's key
    assert openvino.gallery.meta["key"]["encoder"]["backend"] == "openvino"
    assert cosine(openvino.gallery, eager.gallery).min() > 0.9999
    assert cosine(openvino.queries, eager.queries).min() > 0.9999


@pytest.mark.slow  # NNCF's calibration: about 15 s
def test_int8_is_calibrated_on_the_gallery_once_and_embeds_uploads_alike(make_cfg, tmp_path):
    from imgret.api import Embedder

    eager, _, _ = stores(make_cfg, "extract.precision=32-true")
    int8, settings, splits = stores(make_cfg, "extract.precision=int8", "extract.backend=openvino")
    assert int8.gallery.meta["key"]["encoder"]["precision"] == "int8"
    agreement = cosine(int8.gallery, eager.gallery)
    assert agreement.mean() > 0.95 and not np.allclose(agreement, 1.0, atol=1e-6)  # int8: close, not the same
    models = sorted((tmp_path / "cache" / "models").glob("*.xml"))
    # one quantized model for both splits, quantized from the one float conversion
    assert sorted(json.loads(m.with_suffix(".json").read_text())["precision"] for m in models) == ["float", "int8"]
    embedder = Embedder.from_settings(settings, gallery=splits.gallery)
    rows = embedder.embed([splits.queries.open(i) for i in range(3)])
    assert np.abs(rows - np.asarray(int8.queries.vectors[:3])).max() < 1e-4
    assert sorted((tmp_path / "cache" / "models").glob("*.xml")) == models  # read back, not quantized again


@pytest.mark.parametrize("overrides, start", [
    (("extract.precision=int8",), "extract.precision=int8: a precision of this backend: int8 runs on "
                                  "extract.backend=openvino"),
    (("extract.backend=onnx",), "extract.backend=onnx: one of auto, torch, openvino"),
])
def test_what_a_backend_cannot_run_is_refused_in_one_line(make_cfg, overrides, start):
    from imgret.validate import validate_config

    with pytest.raises(ConfigError) as error:
        validate_config(make_cfg(*SMALL, *overrides))
    assert str(error.value).startswith(start) and "\n" not in str(error.value)


def test_a_missing_openvino_is_named_with_what_to_install(make_cfg, monkeypatch):
    from imgret.embed import options
    from imgret.validate import validate_config

    monkeypatch.setattr(options, "_importable", lambda name: name != "nncf")
    validate_config(make_cfg(*SMALL, "extract.backend=openvino"))  # fp32 needs OpenVINO alone, a dependency
    with pytest.raises(ConfigError, match=r"^extract.backend=openvino with extract.precision=int8: nncf not "
                                          r"installed; pip install"):
        validate_config(make_cfg(*SMALL, "extract.backend=openvino", "extract.precision=int8"))
    monkeypatch.setattr(options, "_importable", lambda name: False)
    with pytest.raises(ConfigError, match=r"^extract.backend=openvino: openvino not installed; pip install"):
        validate_config(make_cfg(*SMALL, "extract.backend=openvino"))


@pytest.mark.slow  # two runs
def test_a_run_at_another_precision_is_measured_against_the_fp32_rows(make_cfg):
    """The fp32 eager run first (its stores cached), then bf16: recall@10 against the fp32 rows' neighbours."""
    from imgret.run import run_tracked

    common = (*SMALL, "method=flat", "search.latency_queries=5", "search.warmup_queries=1")
    fp32 = run_tracked(make_cfg(*common, "extract.precision=32-true"))
    assert "recall_at_10_vs_fp32" not in fp32
    bf16 = run_tracked(make_cfg(*common, "extract.precision=bf16-mixed"))
    assert 0.5 < bf16["recall_at_10_vs_fp32"] <= 1.0
    assert bf16["recall_at_10"] == 1.0  # flat over its own rows: exact
