import numpy as np
import pytest
import torch

import imgret.embed.extract
from conftest import SYNTHETIC_FAST, write_images
from imgret.embed.options import ExtractSettings
from imgret.sources.registry import load_splits
from imgret.errors import BadImage
from imgret.embed.extract import ensure_embeddings
from imgret.embed.models import build_encoder
from imgret.embed.store import EmbeddingStore, StagedStore


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_lightning_extraction_writes_a_normalised_store_that_matches_the_model(make_cfg, decoder):
    # fp32, as the rows recomputed below (auto is bf16 where the CPU has it)
    cfg = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=5", "data.query_per_class=2", f"extract.decoder={decoder}",
                   "extract.precision=32-true")
    splits = load_splits(cfg.data, cfg.seed)
    embeddings = ensure_embeddings(splits, ExtractSettings.from_config(cfg))
    gallery = embeddings.gallery
    assert embeddings.extracted == ("gallery", "queries")
    assert gallery.vectors.shape == (50, 512) and gallery.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(gallery.vectors, axis=1), 1.0, atol=1e-5)
    assert gallery.labels.tolist() == splits.gallery.labels.tolist()
    assert gallery.paths == list(splits.gallery.paths)

    # Row i is image i: recompute a few rows directly with the same network and the model's own PIL transform.
    # The pil decoder runs exactly that; torchvision's resize differs by at most 2 of 255 levels in a pixel.
    encoder = build_encoder(cfg.model, cfg.seed)
    picks = [0, 17, 49]
    batch = torch.stack([encoder.transform(splits.gallery.open(i)) for i in picks])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(encoder.network(batch), dim=1).numpy()
    if decoder == "pil":
        assert np.allclose(gallery.vectors[picks], expected, atol=1e-4)
    else:
        assert not np.allclose(gallery.vectors[picks], expected, atol=1e-6)  # these are other pixels ...
        assert np.sum(gallery.vectors[picks] * expected, axis=1).min() > 0.999  # ... of the same images
    assert gallery.meta["key"]["encoder"]["decoder"] == decoder

    timings = embeddings.timings
    assert timings["extract_ms_per_image"] > 0 and timings["extract_images_per_s"] > 0


def test_a_matching_store_is_reused_without_building_a_model(make_cfg, monkeypatch):
    cfg = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=3", "data.query_per_class=1")
    splits = load_splits(cfg.data, cfg.seed)
    first = ensure_embeddings(splits, ExtractSettings.from_config(cfg))

    def no_model(*args, **kwargs):
        raise AssertionError("a cached store must not need the model")

    monkeypatch.setattr(imgret.embed.extract, "build_encoder", no_model)
    second = ensure_embeddings(splits, ExtractSettings.from_config(cfg))
    assert second.extracted == ()
    assert second.gallery.path == first.gallery.path
    assert second.timings == first.timings  # a reused store reports the timings it was made with

    # Another image size changes the vectors, so it needs a new store (and the model).
    other = make_cfg(*SYNTHETIC_FAST, "data.gallery_per_class=3", "data.query_per_class=1", "model.image_size=48")
    with pytest.raises(AssertionError, match="must not need the model"):
        ensure_embeddings(load_splits(other.data, other.seed), ExtractSettings.from_config(other))


def test_a_bad_image_with_on_bad_image_fail_stops_extraction_and_commits_no_store(make_cfg, tmp_path):
    images = tmp_path / "images"
    write_images(images)
    (images / "b" / "5.png").write_bytes(b"not a png")  # the last batch fails to decode
    cfg = make_cfg("data=folder", f"data.gallery_dir={images}", "data.query_fraction=0.2", "data.on_bad_image=fail",
                   "model.pretrained=false", "model.image_size=32", "batch_size=2")
    splits = load_splits(cfg.data, cfg.seed)
    assert str(images / "b" / "5.png") in splits.gallery.paths + splits.queries.paths
    with pytest.raises(BadImage, match=r"b/5\.png: UnidentifiedImageError.*data.on_bad_image=fail"):
        ensure_embeddings(splits, ExtractSettings.from_config(cfg))
    store_root = tmp_path / "cache" / "embeddings"
    committed = [p for p in store_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert all(EmbeddingStore.open(p) is not None for p in committed), committed
    assert not any("gallery" in p.name for p in committed), "the failed split has no store"


def test_bad_images_are_skipped_and_ids_labels_paths_stay_aligned(make_cfg, tmp_path):
    images = tmp_path / "images"
    write_images(images, per_class=8)
    (images / "a" / "2.png").write_bytes(b"")  # zero bytes
    (images / "b" / "3.png").write_bytes((images / "b" / "4.png").read_bytes()[:60])  # truncated
    cfg = make_cfg("data=folder", f"data.gallery_dir={images}", "data.query_fraction=0.25",
                   "model.pretrained=false", "model.image_size=32", "batch_size=3", "extract.precision=32-true")
    splits = load_splits(cfg.data, cfg.seed)
    embeddings = ensure_embeddings(splits, ExtractSettings.from_config(cfg))
    bad = {line.split("\t")[2] for line in embeddings.bad_images}
    assert bad == {str(images / "a" / "2.png"), str(images / "b" / "3.png")}
    stores = {"gallery": embeddings.gallery, "queries": embeddings.queries}
    for name, image_set in (("gallery", splits.gallery), ("queries", splits.queries)):
        store = stores[name]
        usable = [i for i, path in enumerate(image_set.paths) if path not in bad]
        assert store.paths == [image_set.paths[i] for i in usable]
        assert store.labels.tolist() == image_set.labels[usable].tolist()
        assert len(store.vectors) == len(usable) == len(store) == store.meta["image_count"] - store.meta["bad_images"]
    # row i is the i-th usable image: recompute one with the model
    encoder = build_encoder(cfg.model, cfg.seed)
    row = len(embeddings.gallery) - 1
    image = splits.gallery.open(splits.gallery.paths.index(embeddings.gallery.paths[row]))
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(encoder.network(encoder.transform(image)[None]), dim=1).numpy()
    assert np.allclose(embeddings.gallery.vectors[row], expected[0], atol=1e-4)


def unit_rows(n, dim, seed=0):
    rows = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_part(staged, rank, rows, indices):
    vectors_file, index_file, bad_file = staged.open_part(rank)
    vectors_file.write(rows[indices].tobytes())
    index_file.write(np.asarray(indices, dtype=np.int64).tobytes())
    for handle in (vectors_file, index_file, bad_file):
        handle.close()


def test_parts_from_several_ranks_merge_in_image_order(make_cfg, tmp_path):
    """What DDP produces: each rank writes its share (strided, padded with a repeat) to its own part."""
    cfg = make_cfg("data=synthetic", "data.num_classes=1", "data.gallery_per_class=5", "data.query_per_class=1")
    image_set = load_splits(cfg.data).gallery
    rows = unit_rows(5, 3)
    staged = StagedStore(tmp_path / "store", attempt="test")
    staged.record_dim(3)
    for rank, indices in enumerate([[0, 2, 4], [1, 3, 0]]):  # rank 1 repeats image 0, as DistributedSampler pads
        write_part(staged, rank, rows, indices)
    assert staged.merge_parts(image_set, dim=3) == 5
    assert EmbeddingStore.open(tmp_path / "store") is None, "not a store before commit"
    store = staged.commit({"count": 5, "dim": 3})
    assert np.array_equal(store.vectors, rows)
    assert not staged.staging.exists()
    assert EmbeddingStore.open(tmp_path / "store") is not None


def test_resume_keeps_the_whole_valid_rows_of_a_killed_attempt(tmp_path):
    rows = unit_rows(6, 4)
    staged = StagedStore(tmp_path / "store", attempt="a1")
    staged.record_dim(4)
    write_part(staged, 0, rows, [0, 1, 2, 3])
    vectors_path, index_path, bad_path = staged.part_paths(0)
    with open(vectors_path, "r+b") as handle:  # row 3 half-written, as a kill mid-write leaves it
        handle.truncate(3 * 16 + 7)
    with open(vectors_path, "r+b") as handle:  # row 1 corrupted: not unit length
        handle.seek(16)
        handle.write(np.full(4, 9.0, np.float32).tobytes())
    bad_path.write_text("4\t/x/4.jpg\tUnidentifiedImageError: not an image\n5\t/x/5.j")  # last line cut
    progress = StagedStore(tmp_path / "store", attempt="a2").resume(6)
    assert progress.done.tolist() == [0], "the valid prefix only: row 1 is corrupt, so rows after it are redone"
    assert progress.bad == {4: "/x/4.jpg\tUnidentifiedImageError: not an image"}
    assert progress.dim == 4
    assert vectors_path.stat().st_size == 16 and index_path.stat().st_size == 8


def test_the_progress_bar_draws_each_update_once(make_cfg, capsys):
    """A captured log (a job's output file, a CI log) gets one frame per batch done, not two: the bar is not drawn
    again at each batch's start, and it counts batches from its first frame."""
    cfg = make_cfg(*SYNTHETIC_FAST, "extract.progress=true", "num_workers=0", "extract.backend=torch")
    capsys.readouterr()
    ensure_embeddings(load_splits(cfg.data, cfg.seed), ExtractSettings.from_config(cfg))
    frames = [frame for frame in capsys.readouterr().out.replace("\r", "\n").splitlines()
              if "gallery · resnet18" in frame]
    batches = -(-200 // 16)  # SYNTHETIC_FAST: 200 gallery images, batches of 16
    counts = [frame.split("|")[-1].split()[0] for frame in frames]
    assert counts.count(f"{batches}/{batches}") <= 2 and len(frames) <= batches + 3, frames
    assert all("DataLoader" not in frame and "it/s" not in frame for frame in frames), frames
    assert len(set(counts)) == len(counts) - 1, counts  # every count once, the last drawn again as the bar closes
