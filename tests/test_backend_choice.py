"""extract.backend=auto: the fastest backend whose rows are PyTorch eager fp32's, decided once per model and machine
on real gallery images and cached; PyTorch where auto does not compare (a GPU, bf16, no OpenVINO)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import subset_zip
from imgret.embed import backend_choice
from imgret.embed.backend_choice import EQUAL_COSINE, choose_backend, same_neighbours, verdict_path
from imgret.embed.extract import ensure_embeddings
from imgret.embed.options import ExtractSettings
from imgret.sources.registry import load_splits


def settings_of(make_cfg, *overrides) -> ExtractSettings:
    return ExtractSettings.from_config(make_cfg(*overrides))


def test_auto_is_the_default(tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert compose(config_name="config").extract.backend == "auto" == ExtractSettings.backend


def test_auto_is_pytorch_where_it_compares_nothing_and_says_why(make_cfg):
    base = dataclasses.replace(settings_of(make_cfg, "model.pretrained=false"), backend="auto")
    cases = {"extract.precision=bf16-mixed": ("torch", "at bf16-mixed"),
             "extract.precision=int8": ("openvino", "int8 runs on OpenVINO")}
    for override, (backend, words) in cases.items():
        choice = choose_backend(dataclasses.replace(base, precision=override.split("=")[1]), gallery=None)
        assert choice.backend == backend and words in choice.reason and "\n" not in choice.reason
    asked = choose_backend(dataclasses.replace(base, backend="torch"), gallery=None)
    assert asked.tags() == {"extract_backend": "torch", "extract_backend_reason": "asked for (extract.backend)"}


def test_neighbours_are_compared_as_sets_of_rows():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(30, 8))
    assert same_neighbours(rows, rows + 1e-9)
    assert not same_neighbours(rows, rng.normal(size=(30, 8)))


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory):
    return subset_zip(tmp_path_factory.mktemp("auto") / "tiny-subset.zip", 4, 16, 2)  # 64 gallery, 8 queries


@pytest.mark.slow  # the trained EfficientNet-Lite0 at 224 px: converted, compared, extracted twice
def test_the_default_extraction_gives_eager_fp32_s_rows_on_real_images(make_cfg, real_subset, monkeypatch):
    archive, checksum = real_subset
    data = (f"data.archive={archive}", f"data.checksums=[{checksum}]", "model=efficientnet_lite0",
            "extract.precision=32-true")
    eager_settings = settings_of(make_cfg, *data)  # the tests' make_cfg: PyTorch eager
    settings = dataclasses.replace(eager_settings, backend="auto")  # the config's default
    splits = load_splits(make_cfg(*data).data)
    auto = ensure_embeddings(splits, settings)
    eager = ensure_embeddings(splits, eager_settings)
    for mine, reference in ((auto.gallery, eager.gallery), (auto.queries, eager.queries)):
        cosines = np.sum(np.asarray(mine.vectors, np.float64) * np.asarray(reference.vectors, np.float64), axis=1)
        assert cosines.min() >= EQUAL_COSINE
    top = lambda g, q: np.argsort(-(np.asarray(q.vectors) @ np.asarray(g.vectors).T), axis=1)[:, :10]
    assert np.array_equal(top(auto.gallery, auto.queries), top(eager.gallery, eager.queries))

    verdict = json.loads(verdict_path(settings).read_text())
    assert verdict["backend"] in ("torch", "openvino") and verdict["images"] == 64
    assert verdict["cosine_min"] >= EQUAL_COSINE and verdict["same_top_10"], verdict
    backend = auto.gallery.meta["key"]["encoder"].get("backend", "torch")
    assert backend == verdict["backend"], "the store is keyed by the backend that made it"

    # decided once: the next run reads the verdict
    monkeypatch.setattr(backend_choice, "compare_backends", lambda *a: pytest.fail("compared again"))
    assert choose_backend(settings, splits.gallery).reason == verdict["reason"]
    # a verdict that does not read is compared again, not trusted
    verdict_path(settings).write_text("{not json")
    monkeypatch.undo()
    again = choose_backend(settings, splits.gallery)
    assert json.loads(verdict_path(settings).read_text())["reason"] == again.reason
