"""Typed settings below the entry points: a run made from hand-written settings, without Hydra, and a library
user's defaults equal to the command line's (both read from conf/config.yaml)."""
import json
import subprocess
import sys
import textwrap

from conftest import CONF_DIR
from imgret.embed.options import ExtractSettings
from imgret.options import Options
from imgret.pipeline import RunSettings

HAND_MADE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from imgret.embed.options import ExtractSettings
    from imgret.measure.search import SearchSettings
    from imgret.options import Options
    from imgret.pipeline import RunSettings, run_experiment
    from imgret.sources.registry import provide

    data = Options(name="synthetic", num_classes=4, gallery_per_class=12, query_per_class=3, image_size=32,
                   gallery_limit=None, query_limit=None, on_bad_image="skip", max_image_pixels=89478485)
    model = Options(name="resnet18", family="timm", arch="resnet18", pretrained=False, checkpoint=None, image_size=32,
                    bf16_pays=True)
    settings = RunSettings(data=data, method=Options(name="ivf", nlist=4, nprobe=4, train_size=None, on_disk=False),
                           extract=ExtractSettings(model=model, cache_dir=Path(sys.argv[1]), latency_images=2,
                                                   progress=False, backend="torch"),  # as the tests' make_cfg
                           search=SearchSettings(k=10, latency_queries=20, warmup_queries=2, progress=False))
    result = run_experiment(settings, provide(data, 0))
    print(json.dumps({"metrics": result.metrics, "hydra": "hydra" in sys.modules,
                      "gallery_store": result.info["gallery_store"]}))
""")


def test_a_run_from_typed_settings_alone_without_hydra(tmp_path, make_cfg):
    script = tmp_path / "hand_made.py"
    script.write_text(HAND_MADE)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    hand = json.loads(done.stdout.strip().splitlines()[-1])
    assert not hand["hydra"], "Hydra was imported by a run made from typed settings"
    assert hand["metrics"]["recall_at_10"] == 1.0 and hand["metrics"]["gallery_size"] == 48  # nprobe = nlist
    # the same point composed by Hydra and made into settings by the entry point's from_config: the same store
    # (its key covers images, model, weights and preprocessing) and the same figures
    cfg = make_cfg("data=synthetic", "data.num_classes=4", "data.gallery_per_class=12", "data.query_per_class=3",
                   "data.image_size=32", "model.pretrained=false", "model.image_size=32", "method=ivf", "nlist=4",
                   "nprobe=4", f"paths.cache={tmp_path / 'cache'}", "search.latency_queries=20",
                   "search.warmup_queries=2")
    from imgret.pipeline import run_experiment
    from imgret.sources.registry import provide

    composed = run_experiment(RunSettings.from_config(cfg), provide(cfg.data, cfg.seed))
    assert composed.info["gallery_store"] == hand["gallery_store"] and composed.info["embeddings_extracted"] == "none"
    for key in ("recall_at_1", "recall_at_10", "precision_at_10", "recall_at_k_ties"):
        assert composed.metrics[key] == hand["metrics"][key], key


def test_a_library_user_s_defaults_are_the_command_line_s(tmp_path):
    """Settings made by hand with only what has no default equal those the entry point makes from the composed
    config with nothing overridden: both come from conf/config.yaml (the dataclasses read it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.cache={tmp_path}"])
    composed = RunSettings.from_config(cfg)
    by_hand = RunSettings(data=composed.data, method=composed.method,
                          extract=ExtractSettings(model=composed.extract.model, cache_dir=tmp_path))
    assert by_hand == composed


def test_settings_reach_a_rank_process_as_json_and_back(tmp_path):
    model = Options(name="clip", family="open_clip", arch="ViT-B-32", pretrained_tag="openai", pretrained=False)
    settings = ExtractSettings(model=model, cache_dir=tmp_path, precision="bf16-mixed", devices=2)
    assert ExtractSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
