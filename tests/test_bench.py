"""The FLOP count behind `scripts/bench.py --forward`'s fraction of the matrix-product rate."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import htsep
import reference

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_script"]


@pytest.mark.parametrize("queries,keys", [(7, 7), (5, 11)])
def test_fused_attention_counts_both_products(bench, queries, keys):
    q = torch.randn(2, 3, queries, 4)
    k = torch.randn(2, 3, keys, 4)
    v = torch.randn(2, 3, keys, 6)
    model = _Call(lambda x: nn.functional.scaled_dot_product_attention(x, k, v))
    # (queries x 4) @ (4 x keys), then (queries x keys) @ (keys x 6), for 2 x 3 heads.
    expected = 2 * 6 * (queries * 4 * keys + queries * keys * 6)
    assert bench.chunk_flops(model, q) == expected


def test_fused_self_attention_counts_projections_and_products(bench):
    embed, heads, length = 16, 4, 9
    attention = nn.MultiheadAttention(embed, heads, batch_first=True).eval()
    model = _Call(lambda x: attention(x, x, x, need_weights=False)[0])
    # in-projection (3 E x E on each position), attention, output projection (E x E).
    expected = 2 * length * embed * 3 * embed + 2 * 2 * length * length * embed
    expected += 2 * length * embed * embed
    assert bench.chunk_flops(model, torch.randn(1, length, embed)) == expected
    shape = (1, length, embed)
    assert bench.self_attention_flops(shape, shape, shape, embed, heads) == expected


def test_both_networks_count_the_same(bench, tmp_path, monkeypatch):
    """demucs's self-attention takes nn.MultiheadAttention's fused path and htsep's a fused
    attention kernel: with a formula missing for either, the counts would differ. htsep runs
    its plain formulation here: its CPU inference paths add a few products of their own (the
    DConv's folded normalisation), and the count is the network's, taken on demucs."""
    from htsep.model import kernels

    monkeypatch.setattr(kernels, "fast_path", lambda x: None)
    theirs = reference.build(reference.SOURCES_4, reference.SMALL, seed=3).eval()
    path, _ = reference.write_th(theirs, tmp_path, "small")
    ours = htsep.load_model(path).eval()
    mix = torch.randn(1, 2, ours.segment_length, generator=torch.Generator().manual_seed(0))
    counted = bench.chunk_flops(theirs, mix)
    assert counted == bench.chunk_flops(ours, mix)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as plain:
        theirs(mix)
    assert counted > plain.get_total_flops()


class _Call(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def test_network_timer_times_every_network_call_of_the_command(bench, repo, tmp_path):
    """bench.py's launcher runs the real command and reports one time per network call: as
    many calls as the chunks the separation procedure cuts the clip into (1 chunk per call on
    the CPU), each positive, together less than the whole run, and the same stems as the plain
    command."""
    import subprocess
    import time

    import soundfile as sf
    from helpers import RATE, htsep, write_clip

    seconds = 4.0
    clip = write_clip(tmp_path / "clip.wav", seconds)
    timer, report = tmp_path / "timer.py", tmp_path / "times.txt"
    timer.write_text(bench.NETWORK_TIMER)
    args = ["--repo", str(repo), "-n", "aaaa0001", "--shifts", "0", "--float32", "-q"]
    command = bench.network_timed(
        [sys.executable, "-m", "htsep", "separate", *args, "-o", str(tmp_path / "timed"),
         str(tmp_path / "clip.wav")], timer, report,
    )  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    whole = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    calls = bench.read_network_time(report)
    assert not report.exists()
    # The reference procedure: segments of 1.5 s, a stride of 3/4 of one, a chunk per stride.
    segment = int(1.5 * RATE)
    assert len(calls) == -(-clip.shape[0] // int(0.75 * segment))
    assert all(t > 0 for t in calls) and sum(calls) < whole
    result = htsep(*args, "-o", str(tmp_path / "plain"), str(tmp_path / "clip.wav"))
    assert result.exit_code == 0, result.output
    for stem in ("drums", "bass", "other", "vocals"):
        timed, _ = sf.read(tmp_path / "timed" / "aaaa0001" / "clip" / f"{stem}.wav")
        plain, _ = sf.read(tmp_path / "plain" / "aaaa0001" / "clip" / f"{stem}.wav")
        assert timed.shape == plain.shape and (timed == plain).all(), stem


def test_floor_lines_give_the_time_of_the_products_at_the_rate(bench):
    # 4 calls of 3 GFLOP at 2 GFLOP/s: 6 s, half of demucs's 12 s; bf16 at 4 GFLOP/s: 3 s,
    # 0.3 of htsep fp32's 10 s.
    fp32, bf16 = bench.floor_lines(3e9, 4, 2e9, 12.0, 4e9, 10.0, "run")
    assert "4 x 3.0 GFLOP at 2 GFLOP/s = 6.00 s, 0.500 of demucs's run (12.00 s)" in fp32
    assert "at 4 GFLOP/s (bf16 products, 2.00x fp32's) 3.00 s, 0.300 of htsep fp32's run" in bf16
    assert len(bench.floor_lines(3e9, 4, 2e9, 12.0)) == 1


SCRIPTS = SCRIPT.parent
BAD_ARGUMENTS = [
    ("bench.py", ["--baseline", "{nowhere}"], "is not an htsep checkout"),
    ("bench.py", ["--baseline", ""], "empty value"),
    ("bench.py", ["--runs", "0"], "out of range"),
    ("bench.py", ["--seconds", "nan"], "out of range"),
    ("bench_host.py", ["--baseline", "{nowhere}"], "is not an htsep checkout"),
    ("bench_host.py", ["--batch", "0"], "out of range"),
    ("bench_host.py", ["--runs", "0"], "out of range"),
    ("bench_host.py", ["--seconds", "0"], "out of range"),
    ("bench_memory.py", ["--minutes", "-1"], "out of range"),
    ("bench_resample.py", ["--case", "44100", "0", "1"], "out of range"),
    ("bench_resample.py", ["--case", "44100", "500", "1"], "not a whole rate"),
    ("bench_resample.py", ["--case", "44100", "48000", "-1"], "out of range"),
    ("bench_resample.py", ["--threads", "-3"], "out of range"),
    ("bench_folder.py", ["--tracks", "0"], "out of range"),
    ("bench_folder.py", ["--model", ""], "empty value"),
    ("bench_folder.py", ["--model", "nope"], "unknown model"),
    ("bench_gpu.py", ["--smoke", "--json", ""], "empty value"),
    ("bench_gpu.py", ["--smoke", "--json", "{nowhere}/x.json"], "no such folder"),
    ("bench_gpu.py", ["--smoke", "--device", ""], "empty value"),
]


@pytest.mark.parametrize(("script", "args", "phrase"), BAD_ARGUMENTS)
def test_the_scripts_refuse_bad_arguments_before_any_work(tmp_path, script, args, phrase):
    """A traceback (often after minutes of work), or for --baseline with a folder that holds
    no htsep, a baseline column that timed the installed htsep instead."""
    import subprocess

    nowhere = tmp_path / "nowhere"
    args = [a.replace("{nowhere}", str(nowhere)) for a in args]
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and phrase in done.stderr.splitlines()[-1], done.stderr
    assert done.stdout == "" and not nowhere.exists()
