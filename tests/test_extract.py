import numpy as np
import pytest
import torch
from PIL import Image

import imgret.extract
from conftest import SYNTHETIC_FAST
from imgret.data import load_splits
from imgret.extract import ensure_embeddings
from imgret.models import build_encoder
from imgret.store import EmbeddingStore, StagedStore


def test_lightning_extraction_writes_a_normalised_store_that_matches_the_model(make_cfg):
    cfg = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=5", "data.query_per_class=2")
    splits = load_splits(cfg.data, cfg.seed)
    embeddings = ensure_embeddings(splits, cfg)
    gallery = embeddings.gallery
    assert embeddings.extracted == ("gallery", "queries")
    assert gallery.vectors.shape == (50, 512) and gallery.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(gallery.vectors, axis=1), 1.0, atol=1e-5)
    assert gallery.labels.tolist() == splits.gallery.labels.tolist()
    assert gallery.paths == list(splits.gallery.paths)

    # Row i is image i: recompute a few rows directly with the same network and transform.
    encoder = build_encoder(cfg.model, cfg.seed)
    picks = [0, 17, 49]
    batch = torch.stack([encoder.transform(splits.gallery.open(i)) for i in picks])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(encoder.network(batch), dim=1).numpy()
    assert np.allclose(gallery.vectors[picks], expected, atol=1e-4)

    timings = embeddings.timings
    assert timings["extract_ms_per_image"] > 0 and timings["extract_images_per_s"] > 0


def test_a_matching_store_is_reused_without_building_a_model(make_cfg, monkeypatch):
    cfg = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=3", "data.query_per_class=1")
    splits = load_splits(cfg.data, cfg.seed)
    first = ensure_embeddings(splits, cfg)

    def no_model(*args, **kwargs):
        raise AssertionError("a cached store must not need the model")

    monkeypatch.setattr(imgret.extract, "build_encoder", no_model)
    second = ensure_embeddings(splits, cfg)
    assert second.extracted == ()
    assert second.gallery.path == first.gallery.path
    assert second.timings == first.timings  # a reused store reports the timings it was made with

    # Another image size changes the vectors, so it needs a new store (and the model).
    other = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=3", "data.query_per_class=1", "model.image_size=48")
    with pytest.raises(AssertionError, match="must not need the model"):
        ensure_embeddings(load_splits(other.data, other.seed), other)


def test_a_failed_extraction_leaves_no_store(make_cfg, tmp_path):
    images = tmp_path / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(images / cls / f"{i}.png")
    (images / "b" / "5.png").write_bytes(b"not a png")  # the last batch fails to decode
    cfg = make_cfg("data=folder", f"data.gallery_dir={images}", "data.query_fraction=0.2",
                   "model.pretrained=false", "model.image_size=32", "batch_size=2")
    splits = load_splits(cfg.data, cfg.seed)
    assert str(images / "b" / "5.png") in splits.gallery.paths + splits.queries.paths
    with pytest.raises(Exception, match="cannot identify image"):
        ensure_embeddings(splits, cfg)
    store_root = tmp_path / "cache" / "embeddings"
    leftovers = list(store_root.iterdir()) if store_root.exists() else []
    assert all(EmbeddingStore.open(p) is not None for p in leftovers), leftovers
    assert not [p for p in leftovers if ".tmp-" in p.name]


def test_parts_from_several_ranks_merge_in_image_order(make_cfg, tmp_path):
    """What DDP produces: each rank writes its share (strided, padded with a repeat) to its own part."""
    cfg = make_cfg("data=synthetic", "data.num_classes=1", "data.gallery_per_class=5", "data.query_per_class=1")
    image_set = load_splits(cfg.data).gallery
    rows = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    staged = StagedStore(tmp_path / "store", token="test")
    for rank, indices in enumerate([[0, 2, 4], [1, 3, 0]]):  # rank 1 repeats image 0, as DistributedSampler pads
        vectors_file, index_file = staged.open_part(rank)
        vectors_file.write(rows[indices].tobytes())
        index_file.write(np.asarray(indices, dtype=np.int64).tobytes())
        vectors_file.close()
        index_file.close()
    staged.merge_parts(image_set, dim=3, world_size=2)
    assert EmbeddingStore.open(tmp_path / "store") is None, "not a store before commit"
    store = staged.commit({"count": 5, "dim": 3})
    assert np.array_equal(store.vectors, rows)
    assert not staged.staging.exists()
