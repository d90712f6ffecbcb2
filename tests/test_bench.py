"""The benchmark's plumbing at tiny sizes (its timings are not asserted: they belong to the benchmark)."""
import json
import shlex
import statistics

import faiss
import numpy as np
import pytest

from documented import documented
from conftest import clustered_vectors, subset_zip, write_store
from imgret.bench.cli import main
from imgret.bench.verdicts import TARGETS, verdict
from imgret.embed.precision import PRECISION_FLAGS, cpu_flags
from imgret.index.brute import BruteForceIndex


def test_brute_force_single_queries_match_faiss_flat():
    gallery = clustered_vectors(3000, 48, clusters=16, seed=5)
    queries = clustered_vectors(3050, 48, clusters=16, seed=5)[3000:]
    flat = faiss.IndexFlatIP(48)
    flat.add(gallery)
    brute = BruteForceIndex(gallery, query_chunk=7)  # a chunk size that does not divide the queries
    expected_scores, expected_ids = flat.search(queries, 10)
    single = np.concatenate([brute.search(q[None], 10)[1] for q in queries])
    assert np.array_equal(single, expected_ids)
    scores, ids = brute.search(queries, 10)
    assert np.array_equal(ids, expected_ids) and np.allclose(scores, expected_scores, atol=1e-5)


def test_verdicts_name_the_gap():
    assert verdict("brute_vs_matmul_peak", 0.66) == "met (target >= 0.5)"
    assert verdict("brute_vs_faiss_flat", 1.5) == "MISSED: target >= 3, 100.0% short"
    assert verdict("single_query_vs_bandwidth_limit", 2.6) == "MISSED: target <= 1.3, 100.0% short"
    assert verdict("extract_vs_forward", 0.94) == "MISSED: target >= 0.95, 1.1% short"
    # a target inside the rounds' spread is said: another run may land on its other side
    assert verdict("extract_vs_forward", 0.96, (0.93, 0.97)) == \
        "met (target >= 0.95); the target is within the rounds' 0.93-0.97"
    assert verdict("extract_vs_forward", 0.96, (0.955, 0.97)) == "met (target >= 0.95)"
    assert set(TARGETS) >= {"extract_vs_forward", "ivf_harness_overhead", "extract_peak_rss_gb"}


def test_a_ratio_above_one_that_cannot_be_is_flagged_not_met():
    impossible = verdict("extract_vs_forward", 1.66, (1.5, 1.8))
    assert impossible.startswith("IMPOSSIBLE (1.66x, every round above 1: end to end cannot be faster")
    assert "not met" in impossible and "met (" not in impossible
    assert verdict("extract_vs_forward", 0.97) == "met (target >= 0.95)"
    assert verdict("clip_extract_vs_matmul_peak", 0.5) == "MISSED: target >= 0.6, 20.0% short"
    # the tolerance is the rounds' own spread: a median past 1 whose rounds reach below 1 is noise (a model whose
    # loading is negligible), one whose every round is past 1 is a measurement error, however close to 1
    assert verdict("extract_vs_forward", 1.03, (0.98, 1.05)) == "met (target >= 0.95)"
    assert verdict("extract_vs_forward", 1.004, (1.002, 1.006)).startswith("IMPOSSIBLE")
    assert verdict("single_query_vs_bandwidth_limit", 0.7, (0.6, 0.8)).startswith(
        "NOT A MEASURE OF THE BOUND (0.70x, every round below 1")
    assert verdict("single_query_vs_bandwidth_limit", 0.97, (0.9, 1.1)).startswith("met (target <= 1.3)")


def test_alternatives_are_measured_in_turn():
    from imgret.measure.timing import interleaved, spread

    order = []
    figures = interleaved({"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b") or 2.0}, 3)
    assert order == ["a", "b", "b", "a", "a", "b"] and figures == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0) and spread([4.0, 1.0]) == (2.5, 1.0, 4.0)


def test_imgret_and_the_bare_calls_are_timed_on_the_same_queries_after_the_same_warm_ups():
    from imgret.bench.harness import BareCalls, against_bare

    seen = {"imgret": [], "bare": []}

    class RecordingIndex:  # imgret's side: anything with search(queries, k) -> (scores, ids)
        def search(self, rows, k):
            seen["imgret"].append(rows.copy())
            return np.zeros((len(rows), k), np.float32), np.zeros((len(rows), k), np.int64)

    queries = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    figures = against_bare(RecordingIndex(), BareCalls(lambda rows, k: seen["bare"].append(rows.copy())), queries,
                           10, single_queries=7, rounds=2, min_batch_s=0.0, batch_rows=20)
    assert len(seen["imgret"]) == len(seen["bare"])
    for side in seen.values():  # the same batches and warm-ups in the same order; the same timed queries, each once
        assert all(np.array_equal(a, b) for a, b in zip(side[:27], seen["imgret"][:27]))
        assert sorted(map(bytes, side[27:34])) == sorted(map(bytes, seen["imgret"][27:34]))
    # the two calls of a pair take different queries (each side still times every one of the sample)
    assert not any(np.array_equal(a, b) for a, b in zip(seen["imgret"][27:34], seen["bare"][27:34]))
    # a first warm-up; per round: batch calls of 20 rows in whole sweeps over the 50 queries until the pairs are
    # even (min_batch_s=0: two sweeps of three), 20 warm-up and 7 timed one-query calls
    assert [len(rows) for rows in seen["imgret"]] == [8] + 2 * ([20, 20, 10] * 2 + [1] * (20 + 7))
    assert len(figures["batch_ratios"]) == len(figures["single_ratios"]) == 2


def test_batch_pairs_alternate_which_side_goes_first_from_chunk_to_chunk():
    from imgret.bench.harness import BareCalls, against_bare

    calls = []
    sides = [BareCalls(lambda rows, k, who=who: calls.append((who, len(rows)))) for who in ("imgret", "bare")]
    queries = np.zeros((40, 4), np.float32)
    against_bare(sides[0], sides[1], queries, 10, single_queries=0, rounds=2, min_batch_s=0.0, batch_rows=10)
    batch = [who for who, rows in calls if rows == 10]
    # round 1: imgret first on chunk 1, bare first on chunk 2, ...; round 2 starts with bare
    assert batch == ["imgret", "bare", "bare", "imgret"] * 2 + ["bare", "imgret", "imgret", "bare"] * 2


def test_unknown_part_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--parts", "search,warp"])
    assert "unknown part(s) ['warp']; allowed: extract, precision, allocator, search, filtered, ivf, libraries, ddp, verify, " \
        "scale, memory" in capsys.readouterr().err


# Each library's and database's ids are compared with its own calls in test_ann_libraries.py and test_databases.py;
# here the part's timing of imgret against them, over the libraries that build fast and one database (PyNNDescent
# compiles with numba first, about 60 s; every database starts its engine; factory's default trains 32 PQ codebooks,
# ivfpq's path through the part).
TIMED_HERE = ("ivf", "ivfpq", "hnsw", "hnswlib", "usearch", "voyager", "nmslib", "annoy", "pgvector_hnsw")


@pytest.mark.slow
def test_the_libraries_part_times_the_chosen_libraries_against_their_own_calls(tmp_path, capsys):
    # the README's measured run, at a small size; its short form is the same run's first words
    command = shlex.split(documented("--libraries-gallery 20000 --libraries-queries 2000 --single-queries 200"))[3:]
    assert command[:2] == shlex.split(documented("python -m imgret.bench --parts libraries"))[3:]
    result = main(command + ["--cache", str(tmp_path / "cache"), "--gallery", "1500", "--queries", "60",
                   "--dim", "32", "--libraries-gallery", "1500", "--libraries-queries", "60", "--single-queries", "20",
                   "--rounds", "2", "--nlist", "16", "--libraries-methods", ",".join(TIMED_HERE),
                   "--json", str(tmp_path / "bench.json")])["libraries"]
    from imgret.index.methods import METHODS

    measured = {r["method"] for r in result["methods"]}
    assert measured == set(TIMED_HERE)
    assert not result["skipped"]
    printed = capsys.readouterr().out
    flags = " ".join(f for f in PRECISION_FLAGS if f in cpu_flags()) or "none"
    assert f"flags: {flags}" in printed  # the figures name the machine they were measured on
    for r in result["methods"]:
        assert len(r["batch_ratios"]) == len(r["single_ratios"]) == 2 and min(r["batch_ratios"]) > 0, r
        library = METHODS[r["method"]].install.split()[-1].replace("==", " ") if METHODS[r["method"]].install \
            else f"faiss {faiss.__version__}"
        assert r["library"] == library and f"libraries {r['method']} ({library}) " in printed
        assert f"libraries {r['method']}: imgret single-query p50 vs bare" in printed
        assert f"libraries: {r['method']}: imgret vs bare, batch " in printed  # as each one finished


def test_the_readme_ivf_command_times_imgret_against_bare_faiss_on_one_thread(tmp_path, capsys):
    import torch

    command = shlex.split(documented("python -m imgret.bench --parts ivf --threads 1"))[3:]
    threads = torch.get_num_threads()
    try:
        result = main(command + ["--cache", str(tmp_path / "c"), "--gallery", "2000", "--queries", "300", "--dim",
                                 "16", "--nlist", "16", "--nprobe", "4", "--rounds", "2",
                                 "--json", str(tmp_path / "ivf.json")])
    finally:
        torch.set_num_threads(threads)  # --threads sets them for the whole process
        faiss.omp_set_num_threads(threads)
    assert result["parts"] == ["ivf"] and result["machine"]["threads"] == 1
    ivf = result["ivf"]
    assert ivf["batch_rows"] == 200 and len(ivf["batch_ratios"]) == len(ivf["single_ratios"]) == 2
    printed = capsys.readouterr().out
    assert "ivf: nlist=16 nprobe=4 over 2,000 x 16 (clustered random vectors), 300 queries" in printed
    assert "imgret batch calls of 200 queries vs bare faiss, median of 2" in printed and "flags: " in printed


@pytest.mark.slow  # times four sides in turn
def test_the_filtered_part_times_exact_filtered_search_against_the_unfiltered_scan(tmp_path, capsys):
    command = shlex.split(documented("python -m imgret.bench --parts filtered"))[3:]
    result = main(command + ["--cache", str(tmp_path / "c"), "--gallery", "4000", "--queries", "300", "--dim", "16",
                             "--single-queries", "30", "--rounds", "2", "--json", str(tmp_path / "filtered.json")])
    filtered = result["filtered"]
    assert set(filtered["single_ms_rounds"]) == {"unfiltered", "0.01", "0.1", "0.5"}
    assert all(len(rounds) == 2 for rounds in (*filtered["single_ms_rounds"].values(),
                                               *filtered["batch_qps_rounds"].values()))
    assert filtered["selectivities"]["0.1"] == pytest.approx(0.1, abs=0.02)
    printed = capsys.readouterr().out
    for share in ("1%", "10%", "50%"):
        assert f"filtered to {share} (keeps " in printed and f"filtered to {share}: batch" in printed
    assert "vs the bandwidth limit" in printed


@pytest.mark.slow  # converts and quantizes the trained EfficientNet-Lite0: about 60 s
def test_the_readme_precision_command_measures_the_trained_model(tmp_path, monkeypatch, capsys):
    archive, checksum = subset_zip(tmp_path / "tiny-subset.zip", 10, 10, 1)
    monkeypatch.chdir(tmp_path)
    command = shlex.split(documented("python -m imgret.bench --parts precision --precision-images 320 --rounds 3"))[3:]
    import torch

    threads = torch.get_num_threads()
    try:
        result = main(command + ["--archive", str(archive), "--archive-checksum", checksum, "--cache",
                                 str(tmp_path / "c"), "--precision-images", "16", "--rounds", "1", "--batch-size", "8",
                                 "--precision-models", "efficientnet_lite0"])
    finally:
        torch.set_num_threads(threads)  # --threads sets them for the whole process
        import faiss

        faiss.omp_set_num_threads(threads)
    rows = result["precision"]
    assert all(r["weights"] == "trained" and r["image_size"] == 224 for r in rows)
    printed = capsys.readouterr().out
    variants = [(r["backend"], r["precision"]) for r in rows]
    assert variants == [("torch", "32-true"), ("torch", "bf16-mixed"), ("openvino", "32-true"),
                        ("openvino", "bf16-mixed"), ("openvino", "int8")]
    assert {r["model"] for r in rows} == {"efficientnet_lite0"}
    for row in rows:
        assert len(row["images_per_s_rounds"]) == len(row["vs_fp32_eager_rounds"]) == 1
        assert 0.9 < row["cosine_mean"] <= 1.0001 and row["cosine_min"] <= row["cosine_mean"]
        assert 0 < row["recall_at_10"] <= 1.0 and row["queries"] >= 1
        # each precision against the peak of its own kind, the same figure a ratio of
        assert row["peak_of_precision"] == {"32-true": "fp32", "bf16-mixed": "bf16", "int8": "int8"}[row["precision"]]
        assert row["peak_gops"] == result["machine"][f"{row['peak_of_precision']}_peak_gops"]
        if row["peak_note"] is None:  # a precision the CPU runs natively has a peak
            assert row["vs_peak"] == pytest.approx(row["achieved_gops"] / row["peak_gops"])
        else:  # one without native products says so and has no peak
            assert row["peak_gops"] is None and row["vs_peak"] is None and row["peak_note"] in printed
        assert row["cpu_flags"] == " ".join(f for f in PRECISION_FLAGS if f in cpu_flags()) or "none"
    openvino_fp32 = [r for r in rows if r["backend"] == "openvino" and r["precision"] == "32-true"]
    assert all(r["cosine_min"] > 0.9999 for r in openvino_fp32)  # the bound for an fp32 backend
    assert "openvino int8: rows cosine min / mean; recall@10 vs fp32" in printed
    assert "efficientnet_lite0 224px trained, openvino int8: img/s, median of 1" in printed
    assert "CPU flags that decide precision" in printed


@pytest.mark.slow  # one model's five variants in a child process: about 30 s
def test_the_precision_part_under_onednn_s_avx2_cap_names_the_emulated_precisions_and_stays_bounded(tmp_path):
    """What a Zen 3 sees, on any CPU: oneDNN capped at AVX2 has no bf16 or VNNI products, so the part measures no
    such peak, says why, times the emulated bf16 on a short batch, and ends within a bound far above its time."""
    import os
    import subprocess
    import sys
    import time

    archive, checksum = subset_zip(tmp_path / "tiny-subset.zip", 10, 10, 1)
    readme = shlex.split(documented("python -m imgret.bench --parts precision --precision-images 32 --rounds 1 "
                                    "--threads 1"))
    command = [sys.executable, *readme[1:], "--precision-images", "16", "--precision-models", "resnet18",
               "--archive", str(archive), "--archive-checksum", checksum, "--cache", str(tmp_path / "cache"),
               "--json", str(tmp_path / "p.json")]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - start < 600
    assert "bf16: emulated on this CPU (no avx512_bf16 / amx_bf16), not a peak" in done.stdout
    assert "int8: without VNNI on this CPU" in done.stdout
    # OpenVINO, which reads CPUID itself and would compile bf16 kernels its capped oneDNN cannot run, is asked for f32
    assert "openvino bf16-mixed: achieved" in done.stdout and "OpenVINO compiled it as f32" in done.stdout
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["machine"]["bf16_peak_gops"] is None and result["machine"]["int8_peak_gops"] is None
    assert result["machine"]["fp32_peak_gops"] > 0
    bf16 = next(r for r in result["precision"] if (r["backend"], r["precision"]) == ("torch", "bf16-mixed"))
    assert bf16["batch_size"] == bf16["agreement_images"] == 4 and bf16["vs_peak"] is None
    for row in result["precision"]:  # no native products: no peak, said; an emulated one timed on a short batch
        if row["peak_note"] is not None:
            assert row["peak_gops"] is None and row["vs_peak"] is None and row["peak_note"] in done.stdout
            emulated = row["peak_of_precision"] == "bf16"
            assert row["agreement_images"] == (4 if emulated else 16) == row["batch_size"], row
    assert bf16["cosine_min"] > 0.99  # emulated, but bf16's arithmetic all the same
    assert "avx512" not in result["precision"][0]["cpu_flags"]


@pytest.mark.slow  # five fresh processes, each the trained EfficientNet-Lite0 at 224 px, batch 64
def test_the_allocator_part_shows_kept_memory_ends_the_refaulting_without_changing_a_row(tmp_path, monkeypatch,
                                                                                         capsys):
    archive, checksum = subset_zip(tmp_path / "tiny-subset.zip", 4, 16, 1)
    monkeypatch.chdir(tmp_path)
    command = shlex.split(documented("python -m imgret.bench --parts allocator"))[3:] + ["--threads", "1"]
    result = main(command + ["--archive", str(archive), "--archive-checksum", checksum, "--cache",
                             str(tmp_path / "c"), "--rounds", "1", "--allocator-seconds", "0.1"])["allocator"]
    found = result["alternatives"]
    assert list(found) == ["glibc defaults", "GLIBC_TUNABLES before start", "kept_freed_memory (imgret)",
                           "glibc defaults, batch 8", "imgret's default (auto backend)"]
    defaults, kept = found["glibc defaults"], found["kept_freed_memory (imgret)"]
    # counts far apart, not timings: glibc maps and unmaps every large activation again, kept memory does not
    assert kept["minor_faults_per_image_rounds"][0] * 10 < defaults["minor_faults_per_image_rounds"][0]
    assert kept["kernel_share_rounds"][0] < defaults["kernel_share_rounds"][0]
    assert kept["same_rows_as_defaults"] and found["GLIBC_TUNABLES before start"]["same_rows_as_defaults"]
    assert found["imgret's default (auto backend)"]["backend"] in ("torch", "openvino")
    assert "kept_freed_memory (imgret): kernel share; minor faults per image" in capsys.readouterr().out


@pytest.mark.slow  # every part in real processes: about 100 s
def test_every_part_runs_at_tiny_sizes_and_writes_every_figure(tmp_path, monkeypatch, capsys):
    # 10 classes x 10 real images in the official layout: the parts read real JPEGs without unpacking 110,000
    archive, checksum = subset_zip(tmp_path / "tiny-subset.zip", 10, 10, 1)
    monkeypatch.chdir(tmp_path)
    command = documented("python -m imgret.bench --json outputs/bench/bench-default.json")
    tiny = ["--archive", str(archive), "--archive-checksum", checksum, "--cache", str(tmp_path / "cache"), "--images", "64", "--clip-images", "8",
            "--batch-size", "16", "--gallery", "2000", "--queries", "100", "--single-queries", "20", "--nlist", "16",
            "--nprobe", "4", "--memory-sizes", "40,80", "--ddp-images", "48", "--scale-gallery", "3000",
            "--scale-nlist", "16", "--rounds", "2"]
    # the README's two commands: the extract and search parts (written to bench-<time>.json), then the rest
    first = main(shlex.split(documented("python -m imgret.bench --parts extract,search"))[3:] + tiny)
    [written] = (tmp_path / "outputs" / "bench").glob("bench-*.json")
    printed = capsys.readouterr().out
    assert json.loads(written.read_text())["table"] in printed, "the JSON holds the table the command printed"
    # the printed table's figures are the JSON's: the batched brute-force seconds, read back from the text
    brute_row = next(line for line in printed.splitlines() if line.startswith("search    brute force batched"))
    assert float(brute_row.split()[-2]) == pytest.approx(first["search"]["brute_batch_s"], abs=0.006)
    assert first["parts"] == ["extract", "search"] and not {"ivf", "memory"} & set(first)
    others = ["--parts", "ivf,memory,ddp,verify,scale"]  # precision: the README command's own test
    results = main(shlex.split(command)[3:] + tiny + others)
    out = tmp_path / "outputs" / "bench" / "bench-default.json"
    saved = json.loads(out.read_text())
    assert saved["table"] in capsys.readouterr().out
    saved.update({part: json.loads(written.read_text())[part] for part in ("extract", "search")})
    tables = first["table"] + "\n" + saved["table"]
    assert [r["model"] for r in saved["extract"]] == ["resnet18", "mobilenet", "clip"]
    for row in saved["extract"]:
        # achieved GFLOP/s is the throughput times the model's FLOPs, and each rate is its rounds' median
        assert row["achieved_gflops"] == pytest.approx(row["imgret_images_per_s"] * row["gflops_per_image"], rel=1e-6)
        for key in ("imgret_images_per_s", "forward_only_images_per_s"):
            assert row[key] == pytest.approx(statistics.median(row[f"{key}_rounds"]))
        # interleaved rounds: a ratio per round, the median of them reported
        assert row["rounds"] == 2 and len(row["forward_only_images_per_s_rounds"]) == 2
        assert row["extract_vs_forward_rounds"] == pytest.approx(
            [e2e / forward for e2e, forward in zip(row["imgret_images_per_s_rounds"], row["forward_only_images_per_s_rounds"])])
        assert row["extract_vs_forward"] == pytest.approx(sum(row["extract_vs_forward_rounds"]) / 2)
        assert row["precision"] == "32-true" and row["decoder"] == "torchvision"  # pinned: the fp32 peak's
        # the reference decoder in the same rounds, and how much the default one changes the rows
        assert len(row["pil_decoder_images_per_s_rounds"]) == len(row["decoder_vs_pil_rounds"]) == 2
        assert 0.99 < row["decoder_vs_pil_cosine_min"] <= row["decoder_vs_pil_cosine_mean"] < 1.0001
        assert 0 < row["decoder_vs_pil_recall_at_10"] <= 1.0
    # nn.MultiheadAttention's fused inference op is counted: ViT-B/32 at 224 px is 8.7 GFLOP, not the 5.9 seen without
    assert saved["extract"][2]["gflops_per_image"] == pytest.approx(8.73, abs=0.05)
    assert "clip 224px, batch 16: end to end, pil decoder (the reference), interleaved" in tables
    assert "torchvision recall@10 vs pil neighbours" in tables and "target >= 0.6" in tables
    assert "end to end, median of 2 (min-max)" in tables and "; ratios " in tables
    search = saved["search"]
    assert search["source"] == "clustered random vectors" and search["gallery"] == 2000
    assert "  data: clustered random vectors" in tables
    assert search["brute_same_neighbours_as_faiss"] == 1.0
    assert len(search["single_query_vs_bandwidth_limit_rounds"]) == 2 == len(search["memory_bandwidth_gbs_rounds"])
    assert 0 < search["fp16_rounded_gallery_recall_at_10"] <= 1.0
    assert saved["ivf"]["nlist"] == 16 and saved["ivf"]["bare_faiss_batch_s"] > 0
    assert saved["ivf"]["data"] == "clustered random vectors"  # what it searched, as the search part says
    assert [m["images"] for m in saved["memory"]] == [40, 80]
    assert all(m["peak_rss_gb"] > 0.3 for m in saved["memory"])  # a real process with torch loaded
    ddp = saved["ddp"]
    assert len(ddp["one_process_images_per_s"]) == len(ddp["two_processes_images_per_s"]) == 2
    assert all(rate > 0 for rate in ddp["one_process_images_per_s"] + ddp["two_processes_images_per_s"])
    verify = saved["verify"]
    assert verify["gallery"] == 2000 and verify["store_bytes"] > 2000 * 512 * 4 and verify["verified_open_s"] > 0
    scale = saved["scale"]
    assert scale["gallery"] == 3000 and scale["gallery_bytes"] > 3000 * 512 * 4
    assert [s["stage"] for s in scale["stages"]] == ["groundtruth", "ivf", "brute_streamed"]
    assert all(s["peak_rss_bytes"] >= s["baseline_rss_bytes"] > 0 and s["seconds"] > 0 for s in scale["stages"])
    for line in ("brute force vs matmul peak", "faiss.IndexFlatIP batched", "float16 gallery", "peak PSS",
                 "(sha256 of every file)", "exact ground truth, top-10 of 100 queries"):
        assert line in tables


def test_one_part_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = documented("python -m imgret.bench --parts verify")
    results = main(shlex.split(command)[3:] + ["--gallery", "2000", "--cache", str(tmp_path / "cache")])
    assert results["verify"]["gallery"] == 2000 and not {"extract", "search", "memory", "ddp", "scale"} & set(results)
    assert "(sha256 of every file)" in capsys.readouterr().out
    assert len(list((tmp_path / "outputs" / "bench").glob("bench-*.json"))) == 1


def test_looking_for_cached_embeddings_leaves_locks_and_set_aside_stores_alone(tmp_path):
    from imgret.bench.search import search_data

    embeddings = tmp_path / "embeddings"
    (embeddings / ".damaged" / "old-store").mkdir(parents=True)
    (embeddings / "resnet18-tiny_imagenet-gallery-0123.lock").write_text("")
    (embeddings / ".resnet18-tiny_imagenet-gallery-0123.staging").mkdir()
    before = sorted(str(p.relative_to(tmp_path)) for p in embeddings.rglob("*"))
    gallery, queries, source = search_data(tmp_path, 50, 5, 8)
    assert source == "clustered random vectors" and gallery.shape == (50, 8) and queries.shape == (5, 8)
    assert sorted(str(p.relative_to(tmp_path)) for p in embeddings.rglob("*")) == before


def test_the_search_data_says_what_made_it(tmp_path):
    """A store of generated vectors is not "real embeddings"; an extracted one names its model and weights."""
    from imgret.bench.search import search_data

    vectors = clustered_vectors(60, 8, clusters=4)
    for split, count in (("gallery", 50), ("queries", 10)):
        store = write_store(tmp_path / "embeddings" / f"vectors-synthetic_vectors-{split}-0", vectors[:count])
        meta = json.loads((store.path / "meta.json").read_text())
        meta["key"] = {"dataset": "synthetic_vectors", "split": split, "encoder": {"name": "vectors"},
                       "generator": {"seed": 0}}
        (store.path / "meta.json").write_text(json.dumps(meta))
    assert search_data(tmp_path, 50, 5, 8)[2] == "synthetic vectors (data=synthetic_vectors, seed 0), no model"

    from imgret.bench.search import store_label

    encoder = {"name": "resnet18", "arch": "resnet18", "weights": "random:seed0:torch2.14.1", "image_size": 64}
    assert store_label({"dataset": "tiny_imagenet", "encoder": encoder}) == \
        "embeddings of tiny_imagenet images by resnet18 (resnet18, weights random:seed0:torch2.14.1, 64 px)"


def test_the_default_archive_is_the_shared_data_beside_the_checkout():
    """`python -m imgret.bench --parts precision` without --archive reads ../shared/data (it once looked inside the
    checkout and refused every image part)."""
    from conftest import PROJECT_ROOT
    from imgret.bench.machine import DEFAULT_ARCHIVE

    assert DEFAULT_ARCHIVE == PROJECT_ROOT.parent / "shared" / "data" / "tiny-imagenet-200.zip"


def test_the_libraries_part_takes_every_method_unless_told_and_refuses_an_unknown_one(capsys):
    from imgret.bench.cli import parse_args

    assert parse_args(["--parts", "libraries"]).libraries_methods is None  # every installed method
    assert parse_args(["--parts", "libraries", "--libraries-methods", "ivf, hnswlib"]).libraries_methods == \
        ["ivf", "hnswlib"]
    with pytest.raises(SystemExit):
        parse_args(["--parts", "libraries", "--libraries-methods", "ivf,nope"])
    assert "--libraries-methods ivf,nope: allowed, comma-separated: brute" in capsys.readouterr().err
