"""extract.precision=auto: decided from the CPU's flags (fed here, as /proc/cpuinfo would list them) and from what
was measured for the model (model.bf16_pays); the run says which and why, in its log and its tags."""
from __future__ import annotations

import logging

import pytest

from imgret.embed.precision import choose_precision, cpu_info
from conftest import SYNTHETIC_FAST

ZEN4 = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "sse4_2"}
ZEN2 = {"avx2", "fma", "sse4_2"}
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}


def test_auto_runs_bf16_where_the_cpu_has_it_and_it_pays_for_the_model():
    choice = choose_precision("auto", "cpu", True, ZEN4)
    assert choice.precision == "bf16-mixed"
    assert "avx512_bf16" in choice.reason and choice.flags == "avx2 fma avx512f avx512_bf16 avx512_vnni"
    assert choose_precision("auto", "cpu", True, SAPPHIRE_RAPIDS).precision == "bf16-mixed"  # AMX alone counts


def test_auto_stays_fp32_without_bf16_instructions_and_says_why():
    choice = choose_precision("auto", "cpu", True, ZEN2)
    assert choice.precision == "32-true"
    assert "lists no bf16 instructions" in choice.reason and "\n" not in choice.reason
    assert choice.flags == "avx2 fma"
    assert choose_precision("auto", "cpu", True, set()).flags == "none"


@pytest.mark.parametrize("bf16_pays, words", [(False, "measured slower"), (None, "never measured")])
def test_auto_stays_fp32_for_a_model_bf16_does_not_pay_for(bf16_pays, words):
    choice = choose_precision("auto", "cpu", bf16_pays, ZEN4)
    assert choice.precision == "32-true" and words in choice.reason


def test_an_explicit_precision_and_a_gpu_are_not_second_guessed():
    assert choose_precision("bf16-mixed", "cpu", False, ZEN2).precision == "bf16-mixed"
    assert choose_precision("32-true", "cpu", True, ZEN4).precision == "32-true"
    assert choose_precision("auto", "cuda", False, ZEN2).precision == "16-mixed"


def test_the_flags_are_read_from_cpuinfo_text():
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
    assert cpu_info(text) == {"model": "AMD EPYC 9R14", "flags": "fpu avx2 avx512_bf16"}


def test_a_run_logs_and_tags_the_choice(make_cfg, caplog):
    """Through the pipeline on a CPU whose flags say bf16 is emulated: fp32, one log line with the reason."""
    from imgret.embed import precision
    from imgret.run import run_tracked

    cfg = make_cfg(*SYNTHETIC_FAST, "data.num_classes=3", "data.gallery_per_class=4", "data.query_per_class=1",
                   "method=flat", "k=3", "search.latency_queries=4", "search.warmup_queries=1")
    precision.cpu_flags.cache_clear()
    original = precision.cpu_flags
    precision.cpu_flags = lambda: frozenset(ZEN2)
    try:
        with caplog.at_level(logging.INFO, logger="imgret.pipeline"):
            run_tracked(cfg)
    finally:
        precision.cpu_flags = original
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extraction precision")]
    assert lines == ["extraction precision 32-true: auto: fp32, the CPU lists no bf16 instructions (avx512_bf16, "
                     "amx_bf16), so bf16 would be emulated and slower (CPU flags: avx2 fma)"]
    import mlflow

    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")[0]
    assert run.data.tags["extract_precision"] == "32-true"
    assert run.data.tags["cpu_precision_flags"] == "avx2 fma"


def test_a_model_s_bf16_pays_must_be_a_bool(make_cfg):
    from imgret.errors import ConfigError
    from imgret.validate import validate_config

    with pytest.raises(ConfigError, match=r"^model.bf16_pays=often: true or false"):
        validate_config(make_cfg("model.pretrained=false", "model.bf16_pays=often"))
