"""``torchsingd bench`` runs end to end and its FLOP model counts what it says."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from torchsingd.cli import main as cli_main
from torchsingd.experiments import bench


def test_flop_model_of_structured_products():
    assert bench.structure_mm_flops("dense", 10, 3) == 2 * 10 * 10 * 3
    assert bench.structure_mm_flops("diagonal", 10, 3) == 10 * 3
    assert bench.structure_mm_flops("blockdiagonal:4", 12, 3) == 2 * 12 * 4 * 3
    assert bench.structure_product_flops("dense", 5) == 2 * 125
    # Toeplitz: FFT cost grows like d log d, far below the dense d^2 n for large d;
    # one forward and one inverse FFT of length conv_size(d) per column, plus the kernel's
    size = 2048  # conv_size(1024) (= fft_size(1024): nothing wraps)
    fft = 2.5 * size * math.log2(size)
    assert bench.structure_mm_flops("triltoeplitz", 1024, 64) == 64 * 2 * fft + fft + 4 * 64 * 1024
    assert bench.structure_mm_flops("triltoeplitz", 1024, 64) < 0.1 * 2 * 1024**2 * 64
    assert bench.structure_mm_flops("triltoeplitz", 8, 3) == 2 * 8 * 8 * 3  # small: dense
    # d = 785: circular length 1536, 33 outputs wrapped onto (a 33 x 33 product per column)
    fft = 2.5 * 1536 * math.log2(1536)
    want = 64 * 2 * fft + fft + 4 * 64 * 785 + 2 * 64 * 33 * 33
    assert bench.structure_mm_flops("triltoeplitz", 785, 64) == want


def test_bench_rows_are_finite(capsys):
    torch.set_num_threads(1)
    rows = bench.main(
        [
            "--device",
            "cpu",
            "--threads",
            "1",
            "--models",
            "mlp",
            "--structures",
            "diagonal",
            "hierarchical15_15",  # the reference's name: reported (and modelled) canonically
            "--T",
            "10",
            "--dtypes",
            "float32",
            "--rounds",
            "1",
            "--iters",
            "2",
            "--no-peak",
            "--no-reference",
        ]
    )
    assert [r["structure"] for r in rows] == ["diagonal", "hierarchical:15,15"]
    for r in rows:
        for key in ("ours_over_adamw", "state_ratio", "floor_over_adamw"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert math.isfinite(r["optimizer_share"])  # a difference of noisy times
        if r["optimizer_share"] > 0:
            assert math.isfinite(r["gflops"]) and r["gflops"] > 0
        else:  # not measurable: no made-up throughput
            assert r["gflops"] is None and r["fraction_of_peak"] is None
        assert r["state_ratio"] < 2.0  # structured: below AdamW's 2x parameter bytes
    assert "speed-up over the reference" not in capsys.readouterr().out  # no reference


def test_cli_forwards_bench_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    assert "--structures" in capsys.readouterr().out


def test_throughput_is_absent_when_the_optimizer_time_is_noise():
    """A non-positive ``t_ours - t_null`` gives no GFLOP/s (it printed 4.4e6 GFLOP/s
    for a -4% share once); a positive one gives work / time and its peak fraction."""
    assert bench.throughput(2e9, -1e-3, 100e9) == (None, None)
    assert bench.throughput(2e9, 0.0, 100e9) == (None, None)
    gflops, of_peak = bench.throughput(2e9, 0.04, 100e9)
    assert gflops == pytest.approx(50.0) and of_peak == pytest.approx(0.5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtypes", "foo"], "invalid choice: 'foo'"),
        (["--rounds", "0"], "--rounds: must be >= 1"),
        (["--threads", "0"], "--threads: must be >= 1"),
        (["--T", "0"], "--T: must be >= 1"),
        (["--batch", "0"], "--batch: must be >= 1"),
        (["--structures", "foo"], "Unknown structure 'foo'. Valid forms"),
        (["--json", "/nonexistent-dir/x.json"], "its folder does not exist"),
        (["--json", "/proc/x.json"], "--json: cannot write /proc/x.json"),
        (["--json", ""], "--json: must not be empty"),
        (["--device", "foo"], "argument --device: 'foo': the benchmark runs on cpu or cuda[:N]"),
        (["--device", "tpu"], "'tpu': the benchmark runs on cpu or cuda[:N]"),  # (listed
        # torch's every device type as valid)
        (["--device", "mps"], "'mps': the benchmark runs on cpu or cuda[:N]"),
        pytest.param(
            ["--device", "cuda"],
            "argument --device: 'cuda'",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists"),
        ),
    ],
)
def test_bad_bench_options_fail_before_measuring(argv, message, capsys, monkeypatch):
    from torchsingd.experiments import bench

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured before validating")

    monkeypatch.setattr(bench, "matmul_throughput", no_measuring)
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_recurrent_model_rows_and_flops():
    """The LSTM model's captured rows are its (sample, step) pairs, and its FLOP model
    counts both blocks (``ih``: 29 -> 512, ``hh``: 129 -> 512)."""
    model = bench.RowLSTM()
    x, _ = bench.data(4, torch.device("cpu"), torch.float32)
    assert bench.captured_rows(model, x) == {"rnn": 4 * 28, "head": 4}
    got = bench.preconditioner_flops(model, "diagonal", 1, {"rnn": 112})
    per_block = [  # natural gradient (one product per side) and one factor update
        bench.structure_mm_flops("diagonal", d_i, 512)
        + bench.structure_mm_flops("diagonal", 512, d_i)
        + bench.factor_update_flops("diagonal", d_i, 112)
        + bench.factor_update_flops("diagonal", 512, 112)
        for d_i in (29, 129)
    ]
    assert got == pytest.approx(sum(per_block))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_probe_gives_a_positive_throughput(dtype):
    """The probe's size adapts to the machine (a slow bfloat16 CPU product stops it at
    a small size instead of seven 2048^3 products): a finite positive FLOP rate."""
    torch.set_num_threads(1)
    flops = bench.matmul_throughput(torch.device("cpu"), dtype)
    assert math.isfinite(flops) and flops > 0


def test_ratios_are_paired_by_round():
    """A ratio is the median of the rounds' own ratios (BENCHMARKING.md: "median of
    at least 5 pairs"): the machine slows down from round 3 on, caught by AdamW's run
    in round 3 and by ours only from round 4 (they run one after the other). Ours is
    1.2x AdamW in every round the two ran at one speed; the ratio of the two medians
    reads 0.6x."""
    adamw = [10.0, 10.0, 20.0, 20.0, 20.0]
    ours = [12.0, 12.0, 12.0, 24.0, 24.0]
    ratios = bench.paired_ratios(ours, adamw)
    assert ratios == pytest.approx([1.2, 1.2, 0.6, 1.2, 1.2])
    assert statistics.median(ratios) == pytest.approx(1.2)
    assert statistics.median(ours) / statistics.median(adamw) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        bench.paired_ratios([1.0], [1.0, 2.0])


def test_peak_column_is_the_ratio_of_medians_over_peak_runs(monkeypatch):
    """``--peak-runs N``: each candidate's peak is the median of N fresh runs (one run's
    peak RSS spreads by several percent), the column their ratio."""
    calls = []
    values = {"adamw": iter([100.0, 300.0, 110.0]), "ours": iter([120.0, 50.0, 130.0])}

    def fake_peak(kind, model_name, structure, T, device, dtype, batch, iters=10):
        calls.append((kind, structure, T))
        return next(values[kind])

    monkeypatch.setattr(bench, "peak_memory", fake_peak)
    torch.set_num_threads(1)
    args = ["--device", "cpu", "--threads", "1", "--models", "mlp", "--structures"]
    args += ["diagonal", "--T", "10", "--dtypes", "float32", "--rounds", "1", "--iters", "2"]
    rows = bench.main([*args, "--no-reference", "--no-progress", "--peak-runs", "3"])
    assert calls == [("adamw", "dense", 1)] * 3 + [("ours", "diagonal", 10)] * 3
    assert rows[0]["peak_ratio"] == pytest.approx(120.0 / 110.0)
    with pytest.raises(SystemExit):
        bench.main([*args, "--peak-runs", "0"])


def _row(structure, T, ours, floor, ref=None, dtype="float32", model="mlp"):
    return dict(
        model=model,
        structure=structure,
        T=T,
        dtype=dtype,
        ours_over_adamw=ours,
        floor_over_adamw=floor,
        ref_over_adamw=ref,
        ref_over_ours=None if ref is None else ref / ours,
    )


def test_reach_names_the_rows_whose_floor_is_above_their_line():
    """A floor above the row's target line (T=10: dense 2x, structured 1.25x; T=1:
    structured 2x, dense none; float32 only) is out of reach; the bound on the median
    speed-up over the reference is the median of ``ref / floor``."""
    rows = [
        _row("dense", 10, 3.7, 3.16, ref=5.26),  # above 2x: out of reach
        _row("dense", 1, 11.0, 12.2, ref=11.6),  # T=1 dense: no target
        _row("diagonal", 10, 1.07, 0.74, ref=1.03),  # reachable by the floor
        _row("blockdiagonal:30", 10, 1.33, 1.30, ref=1.69),  # above 1.25x
        _row("hierarchical:15,15", 1, 2.56, 2.01),  # above 2x, no reference
        _row("triltoeplitz", 10, 3.5, 1.3, dtype="bfloat16"),  # no bfloat16 target
    ]
    out, bound = bench.reach(rows)
    assert [(r["structure"], r["T"], line) for r, line in out] == [
        ("dense", 10, 2.0),
        ("blockdiagonal:30", 10, 1.25),
        ("hierarchical:15,15", 1, 2.0),
    ]
    ratios = [5.26 / 3.16, 11.6 / 12.2, 1.03 / 0.74, 1.69 / 1.30]
    assert bound == pytest.approx(statistics.median(ratios))
    assert bench.reach([_row("diagonal", 10, 1.0, 0.7)]) == ([], None)


def test_summary_prints_what_is_out_of_reach(capsys):
    bench.summarize([_row("dense", 10, 3.7, 3.16, ref=5.26), _row("diagonal", 10, 1.1, 0.7)])
    out = capsys.readouterr().out
    assert "out of reach on this machine" in out
    assert "mlp dense T=10 float32: floor 3.16x > 2.00x (measured 3.70x)" in out
    assert "at most 1.66x (target 3x)" in out
