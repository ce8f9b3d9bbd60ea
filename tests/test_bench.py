"""scripts/bench.py in CI size: every measurement of every implementation comes out as complete JSON.

No timing is asserted here: speed is measured by running the script, not by a unit test.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
OURS = ("phi3_scratch", "phi3_scratch-sdpa", "phi3_scratch-compiled", "phi3_scratch-int8",
        "phi3_scratch-compiled-int8")
THEIRS = ("transformers-eager", "transformers-sdpa", "transformers-compiled")
KEYS = {"measure", "impl", "config", "device", "dtype", "torch", "tokens", "median_s", "tokens_per_s",
        "ms_per_token", "runs_s", "ratio_to_transformers_eager", "peak_memory_bytes", "weights_bytes"}


def test_bench_script_prints_every_measurement(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", "small", "--runs", "2", "--new-tokens",
                           "4", "--prompt-len", "8", "--prefill", "16", "--markdown", str(markdown)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    expected = {("first_token", i) for i in OURS + THEIRS} | {("decode_cached", i) for i in OURS + THEIRS}
    expected |= {("decode_uncached", i) for i in ("phi3_scratch", *THEIRS[:2])}
    expected |= {("prefill_16", i) for i in ("phi3_scratch", "phi3_scratch-sdpa", *THEIRS[:2])}
    assert {(r["measure"], r["impl"]) for r in rows} == expected
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert len(r["runs_s"]) == 2 and r["tokens_per_s"] > 0 and r["ratio_to_transformers_eager"] > 0
    for r in rows:
        if r["measure"] == "decode_cached":  # a number, or None where the two medians left no positive step
            assert r["decode_step_ms"] is None or r["decode_step_ms"] > 0
    table = markdown.read_text()
    assert table.count("| decode_cached |") == 8 and "torch " in table
    compiled = {r["impl"]: r["warmup_s"] for r in rows if r["measure"] == "first_token"}
    # warm-up reported
    assert compiled["transformers-compiled"] > 0 and compiled["phi3_scratch-compiled-int8"] > 0
    int8 = next(r for r in rows if r["impl"] == "phi3_scratch-int8" and r["measure"] == "decode_cached")
    full = next(r for r in rows if r["impl"] == "phi3_scratch" and r["measure"] == "decode_cached")
    # int8 matrices (a quarter of fp32), fp32 embedding
    assert int8["weights_bytes"] < 0.6 * full["weights_bytes"]


def test_parity_script_reports_both_dtypes():
    """On a tied, grouped-query config: both models must share every weight, the head included."""
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "parity.py"), "--config", "micro-tied",
                           "--seq-len", "16",
                           "--paths", "eager", "compiled", "int8", "int4"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {(r["dtype"], r["path"]): r for r in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == {(d, p) for d in ("fp32", "bf16") for p in ("eager", "compiled", "int8", "int4")}
    assert not [row for row in rows.values() if "error" in row]  # a failed path prints a row with its error
    # reported
    assert rows[("fp32", "int8")]["top1_agreement"] > 0.5 and rows[("fp32", "int8")]["max_abs_diff"] > 0
    # 4 bits move logits more
    assert rows[("fp32", "int4")]["max_abs_diff"] > rows[("fp32", "int8")]["max_abs_diff"]
    for path in ("eager", "compiled"):
        fp32, bf16 = rows[("fp32", path)], rows[("bf16", path)]
        assert fp32["max_abs_diff"] < 1e-3 and fp32["top1_agreement"] == 1.0
        assert bf16["max_abs_diff"] < 0.1 * bf16["max_abs_logit"] and bf16["top1_agreement"] > 0.5
    assert rows[("fp32", "compiled")]["positions"] == 8  # the second half, one compiled step each


def test_decode_figures_follow_from_the_timings():
    """The per-step and bandwidth columns, from made-up timings (no clock is read)."""
    from phi3_scratch.benchmark import decode_figures

    # 11 tokens in 0.5 s, of which the prefill (the first token) took 0.1 s: 10 steps of 40 ms.
    row = decode_figures(0.5, 0.1, 11, step_bytes=8_000_000, bandwidth=1e9)
    assert row["decode_step_ms"] == 40.0
    assert row["achieved_gb_per_s"] == 0.2  # 8 MB x 11 tokens / 0.5 s = 176 MB/s, rounded
    assert row["bandwidth_fraction"] == 0.176 and row["copy_gb_per_s"] == 1.0
    assert row["step_gb_per_s"] == 0.2 and row["step_bandwidth_fraction"] == 0.2  # 8 MB / 40 ms
    # On a busy machine the prefill's median can exceed the whole decode's: no negative step.
    busy = decode_figures(0.1, 0.12, 11, step_bytes=8_000_000, bandwidth=1e9)
    assert busy["decode_step_ms"] is None and busy["step_gb_per_s"] is None and busy["bandwidth_fraction"] > 0
    # the CPU: no copy figure
    assert decode_figures(0.5, 0.1, 11, 8_000_000, None) == {"decode_step_ms": 40.0}


def test_bandwidth_columns_and_profile_on_the_cpu(monkeypatch, capsys, tmp_path):
    """The GPU-only columns, exercised on the CPU with a stand-in copy bandwidth of 1 GB/s."""
    from phi3_scratch import benchmark

    monkeypatch.setattr(benchmark, "copy_bandwidth", lambda device: 1e9)
    benchmark.main(["--config", "micro", "--runs", "1", "--new-tokens", "3", "--prompt-len", "4", "--prefill",
                    "8",
                    "--transformers", "eager", "--ours", "phi3_scratch", "phi3_scratch-compiled-sdpa",
                    "--profile", str(tmp_path / "profile.txt")])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    decode = [r for r in rows if r["measure"] == "decode_cached"]
    assert {r["impl"] for r in decode} == {"phi3_scratch", "phi3_scratch-compiled-sdpa", "transformers-eager"}
    for r in decode:
        # achieved_gb_per_s is rounded to 0.1 GB/s: a slow step on a busy machine can make it 0.0
        assert r["copy_gb_per_s"] == 1.0 and r["achieved_gb_per_s"] >= 0 and "step_bandwidth_fraction" in r
    assert all("bandwidth_fraction" not in r for r in rows if r["measure"] != "decode_cached")
    profile = (tmp_path / "profile.txt").read_text()
    assert "## eager: prefill of 4 + 10 decode steps" in profile and "## compiled:" in profile
    assert "aten::mm" in profile  # the eager table names the matrix products
    assert "- a step of generate (the loop around the step included): " in profile
    assert "- the compiled step alone, replayed back to back: " in profile


def test_kernel_timeline_finds_the_gaps_between_kernels():
    """The GPU timeline of the profile, from made-up kernel times (us): overlaps count once."""
    from phi3_scratch.profiling import kernel_timeline

    kernels = [(50, 60, "down_proj"), (0, 10, "qkv"), (12, 20, "attention"), (15, 18, "softmax")]
    lines = kernel_timeline(kernels, steps=2)
    # running: 0-10, 12-20, 50-60 = 28 us; idle: 10-12 and 20-50 = 32 us; per step, in ms
    assert lines[0] == "- kernels: 2 a step, running 0.014 ms a step, none running 0.016 ms a step " \
                       "(profiled; from the first kernel to the last)"
    assert lines[4:] == ["        30.0  attention  ->  down_proj", "         2.0  qkv  ->  attention"]
    assert kernel_timeline([], steps=1) == ["- kernels: the profiler recorded none"]


def test_a_benchmark_stopped_by_sigterm_reports_the_runs_it_finished(monkeypatch, capsys, tmp_path):
    """`timeout` on a GPU run: SIGTERM (here raised by the 10th timed call) ends the measuring, the
    finished runs are reported, and the profile is skipped."""
    from phi3_scratch import benchmark

    calls = []

    def timed(fn, device):
        calls.append(fn)
        if len(calls) == 10:
            benchmark.time_is_up(signal.SIGTERM, None)
        return 0.01 * len(calls)  # made up: no clock is read

    monkeypatch.setattr(benchmark, "timed", timed)
    benchmark.main(["--config", "micro", "--runs", "5", "--new-tokens", "2", "--prompt-len", "4", "--prefill",
                    "--transformers", "eager", "--ours", "phi3_scratch", "--profile",
                    str(tmp_path / "profile.txt")])
    captured = capsys.readouterr()
    rows = {(r["measure"], r["impl"]): r for r in map(json.loads, captured.out.splitlines())}
    # 3 jobs x 2 implementations a run: run 0 (the warm-up) is calls 1-6; run 1 finished 3 before the 10th
    assert set(rows) == {("first_token", "phi3_scratch"), ("first_token", "transformers-eager"),
                         ("decode_cached", "phi3_scratch")}
    assert rows[("first_token", "phi3_scratch")]["runs_s"] == [0.07]
    assert rows[("first_token", "phi3_scratch")]["warmup_s"] == 0.01
    assert rows[("decode_cached", "phi3_scratch")]["runs_s"] == [0.09]
    assert "stopped by SIGTERM" in captured.err
    assert not (tmp_path / "profile.txt").exists()


def test_a_benchmark_stopped_in_its_warm_up_reports_nothing_and_writes_no_table(monkeypatch, capsys,
                                                                                tmp_path):
    from phi3_scratch import benchmark

    calls = []

    def timed(fn, device):
        calls.append(fn)
        if len(calls) == 3:  # SIGTERM during run 0, the warm-up: nothing measured yet
            benchmark.time_is_up(signal.SIGTERM, None)
        return 0.01

    monkeypatch.setattr(benchmark, "timed", timed)
    benchmark.main(["--config", "micro", "--runs", "2", "--new-tokens", "2", "--prompt-len", "4", "--prefill",
                    "--transformers", "eager", "--ours", "phi3_scratch", "--markdown",
                    str(tmp_path / "B.md")])
    captured = capsys.readouterr()
    assert captured.out == "" and "stopped by SIGTERM" in captured.err and not (tmp_path / "B.md").exists()
