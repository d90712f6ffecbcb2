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


def test_auto_is_fp32_on_every_cpu_and_says_where_bf16_would_pay():
    """The same rows on every CPU by default: bf16 is one flag away, and the reason says where it would pay."""
    choice = choose_precision("auto", "cpu", True, ZEN4)
    assert choice.precision == "32-true" and choice.reason.startswith("auto: fp32, the same rows on every CPU")
    assert "avx512_bf16 and bf16 measured faster" in choice.reason and "extract.precision=bf16-mixed" in choice.reason
    assert choice.flags == "avx2 fma avx512f avx512_bf16 avx512_vnni"
    assert "amx_bf16" in choose_precision("auto", "cpu", True, SAPPHIRE_RAPIDS).reason  # AMX alone counts
    assert choose_precision("bf16-mixed", "cpu", True, ZEN4).precision == "bf16-mixed"


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
    assert lines == ["extraction precision 32-true: auto: fp32, the same rows on every CPU (this one lists no bf16 "
                     "instructions, avx512_bf16 or amx_bf16: bf16 would be emulated and slower) (CPU flags: avx2 fma)"]
    import mlflow

    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")[0]
    assert run.data.tags["extract_precision"] == "32-true"
    assert run.data.tags["cpu_precision_flags"] == "avx2 fma"


def test_a_model_s_bf16_pays_must_be_a_bool(make_cfg):
    from imgret.errors import ConfigError
    from imgret.validate import validate_config

    with pytest.raises(ConfigError, match=r"^model.bf16_pays=often: true or false"):
        validate_config(make_cfg("model.pretrained=false", "model.bf16_pays=often"))


# --------------------------------------------------------------------------- CPUs without AVX-512, BF16 or VNNI

ZEN3 = {"avx2", "fma", "sse4_2"}


@pytest.mark.parametrize("cap, kept", [
    ("AVX2", {"avx2", "fma", "sse4_2"}),  # what oneDNN may use on a Zen 4 capped like a Zen 3
    ("avx512_core_vnni", {"avx2", "fma", "sse4_2", "avx512f", "avx512_vnni"}),  # the names are case-blind
    ("AVX512_CORE_BF16", ZEN4), ("ALL", ZEN4), (None, ZEN4), ("NOT_AN_ISA", ZEN4)])
def test_onednn_s_isa_cap_hides_the_flags_above_it(cap, kept):
    from imgret.embed.precision import isa_capped

    assert isa_capped(frozenset(ZEN4), cap) == kept
    assert isa_capped(frozenset(SAPPHIRE_RAPIDS), "AVX512_CORE_AMX") == SAPPHIRE_RAPIDS


def test_the_flags_extraction_reads_follow_onednn_max_cpu_isa_in_a_child_process():
    import subprocess
    import sys

    code = "from imgret.embed.precision import cpu_flags; print(sorted(cpu_flags() & {'avx512f', 'avx512_bf16'}))"
    capped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert capped.stdout.strip() == "[]"


def test_a_precision_without_native_products_has_no_peak_and_says_so():
    import time

    from imgret.bench.precision import emulated, precision_peaks_gops

    assert emulated("bf16", frozenset(ZEN3)) == "bf16: emulated on this CPU (no avx512_bf16 / amx_bf16), not a peak"
    assert emulated("int8", frozenset(ZEN3)).startswith("int8: without VNNI on this CPU (no avx512_vnni")
    assert emulated("bf16", frozenset(ZEN4)) is None and emulated("fp32", frozenset(ZEN3)) is None
    start = time.perf_counter()
    peaks = precision_peaks_gops(seconds=0.5, flags=frozenset(ZEN3))
    assert peaks["bf16"] is None and peaks["int8"] is None and peaks["fp32"] > 0
    assert time.perf_counter() - start < 5, "only fp32 is measured, within its budget"


def test_a_rate_probe_never_starts_a_call_that_cannot_fit_its_budget():
    import time

    from imgret.measure.timing import best_rate

    sizes = []

    def cubic(n):  # a slow path: 1 ms at 256, 0.5 s at 2048, 4 s at 4096
        sizes.append(n)
        time.sleep(1e-3 * (n / 256) ** 3)

    start = time.perf_counter()
    rate = best_rate(cubic, lambda n: n ** 3, seconds=1.5)
    took = time.perf_counter() - start
    assert 4096 not in sizes and took < 2.5, (sorted(set(sizes)), took)
    assert rate == pytest.approx(256 ** 3 / 1e-3, rel=0.3)  # the sleep's own rate, whatever the size
    assert max(sizes) == 2048 and sizes.count(2048) >= 2, "the rest of the budget goes to the largest that fits"
