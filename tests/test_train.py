"""Training: the loss falls, resuming equals not stopping, two processes agree, fine-tuning
starts from the checkpoint, and the run folder is usable by ``htsep separate``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import reference
from htsep.cli import app
from htsep.data import find_tracks
from htsep.errors import UsageError
from htsep.train import (
    GAIN_RANGE,
    METRICS,
    MODEL_FILE,
    STATE_FILE,
    Excerpts,
    Trainer,
    TrainOptions,
    WeightAverage,
    build_model,
)

RATE = 8000
SOURCES = ["drums", "bass", "other", "vocals"]
# A toy architecture that takes milliseconds per step: 4 channels, 2 levels, 0.5-s segments.
TOY = {
    "samplerate": RATE,
    "segment": 0.5,
    "channels": 4,
    "depth": 2,
    "nfft": 256,
    "t_layers": 1,
    "t_heads": 2,
    "dconv_comp": 2,
}


def _tone(frequency: float, frames: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(frames) / RATE
    phase = rng.uniform(0, 2 * np.pi)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
    return (0.2 * envelope * np.sin(2 * np.pi * frequency * t + phase)).astype(np.float32)


def write_toy_dataset(root: Path, tracks: int = 3, seconds: float = 1.5, seed: int = 0) -> Path:
    """Four sources that differ in pitch, so that even a toy network learns to split them."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * RATE)
    for split, count in (("train", tracks), ("test", 1)):
        for index in range(count):
            folder = root / split / f"track{index}"
            folder.mkdir(parents=True)
            stems = {}
            for source, base in zip(SOURCES, (60.0, 110.0, 440.0, 1300.0), strict=True):
                left = _tone(base * rng.uniform(0.9, 1.1), frames, rng)
                right = _tone(base * rng.uniform(0.9, 1.1), frames, rng)
                stems[source] = np.stack([left, right], axis=1)
                sf.write(folder / f"{source}.wav", stems[source], RATE, subtype="FLOAT")
            sf.write(folder / "mixture.wav", sum(stems.values()), RATE, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "data")


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "toy.yaml"
    path.write_text(json.dumps(TOY))
    return path


def _options(dataset: Path, config: Path, **changes) -> TrainOptions:
    base = TrainOptions(
        dataset=str(dataset),
        config=str(config),
        steps=6,
        batch_size=2,
        lr=1e-3,
        log_every=1,
        save_every=3,
        valid_every=0,
    )
    return dataclasses.replace(base, **changes)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def _train(options: TrainOptions, run: Path, resume: bool = False):
    return Trainer(options, run, device="cpu", resume=resume, progress=False).run()


def test_loss_falls(toy_dataset, toy_config, tmp_path):
    options = _options(toy_dataset, toy_config, steps=120, log_every=30, save_every=120, lr=3e-3)
    _train(options, tmp_path / "run")
    losses = [record["loss"] for record in _metrics(tmp_path / "run") if "loss" in record]
    assert len(losses) == 4
    assert losses[-1] < 0.85 * losses[0], losses


def test_run_folder_contents_and_separation(toy_dataset, toy_config, tmp_path):
    run = tmp_path / "run"
    _train(_options(toy_dataset, toy_config, steps=2, save_every=1), run)
    records = _metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(set(r) == {"step", "loss", "lr"} for r in steps)
    valid = [r for r in records if "valid" in r]
    assert len(valid) == 1 and set(valid[0]["valid"]) == set(SOURCES)
    assert records[-1]["event"] == "end" and len(records[-1]["rank_digests"]) == 1
    # The exported model separates through the CLI like any checkpoint.
    mix = toy_dataset / "test" / "track0" / "mixture.wav"
    result = CliRunner().invoke(
        app, ["separate", "-q", "-n", str(run / MODEL_FILE), "-o", str(tmp_path / "out"), str(mix)]
    )
    assert result.exit_code == 0, result.output
    stems = sorted(p.stem for p in (tmp_path / "out").rglob("*.wav"))
    assert stems == sorted(SOURCES)


def test_resumed_run_equals_uninterrupted(toy_dataset, toy_config, tmp_path):
    options = _options(toy_dataset, toy_config, ema=0.9)
    _train(options, tmp_path / "whole")
    _train(dataclasses.replace(options, steps=3), tmp_path / "halves")
    # Records written after the last save of an interrupted run are dropped on resume.
    with open(tmp_path / "halves" / METRICS, "a") as log:
        log.write(json.dumps({"step": 4, "loss": 123.0, "lr": 1.0}) + "\n")
    _train(options, tmp_path / "halves", resume=True)
    whole = torch.load(tmp_path / "whole" / STATE_FILE, weights_only=True)
    halves = torch.load(tmp_path / "halves" / STATE_FILE, weights_only=True)
    assert whole["step"] == halves["step"] == 6
    for key, value in whole["model"].items():
        assert torch.equal(value, halves["model"][key]), key
    for key, value in whole["ema"].items():
        assert torch.equal(value, halves["ema"][key]), key
    exported = load_file(tmp_path / "whole" / MODEL_FILE)
    again = load_file(tmp_path / "halves" / MODEL_FILE)
    assert all(torch.equal(exported[k], again[k]) for k in exported)

    def losses(run):
        return [(r["step"], r["loss"]) for r in _metrics(run) if "loss" in r]

    assert losses(tmp_path / "whole") == losses(tmp_path / "halves")


def test_ema_exports_the_average(toy_dataset, toy_config, tmp_path):
    run = tmp_path / "run"
    _train(_options(toy_dataset, toy_config, steps=3, ema=0.5), run)
    state = torch.load(run / STATE_FILE, weights_only=True)
    exported = load_file(run / MODEL_FILE)
    for key, value in state["ema"].items():
        assert torch.equal(exported[key], value), key
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["ema"])


def test_weight_average_formula():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightAverage(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(3.0)
    average.update(model)
    assert torch.allclose(average.state["weight"], torch.full((1, 2), 0.75 * 1 + 0.25 * 3))


def test_fine_tuning_starts_from_the_checkpoint(toy_dataset, toy_config, tmp_path):
    _train(_options(toy_dataset, toy_config, steps=2), tmp_path / "base")
    base = tmp_path / "base" / MODEL_FILE
    tuned = _options(toy_dataset, None, init=str(base), steps=1, lr=1e-9)
    tuned = dataclasses.replace(tuned, config=None)
    _train(tuned, tmp_path / "tuned")
    before, after = load_file(base), load_file(tmp_path / "tuned" / MODEL_FILE)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)


def test_examples_are_augmented_excerpts(tmp_path):
    """Sources are excerpts of the stem files, scaled by a gain in GAIN_RANGE, maybe negated
    and channel-swapped; each example depends only on (seed, step, item)."""
    frames = 4000
    ramp = np.arange(1, frames + 1, dtype=np.float32) / frames
    folder = tmp_path / "data" / "train" / "t"
    folder.mkdir(parents=True)
    for index, source in enumerate(SOURCES):
        stem = np.stack([ramp * (index + 1), -0.5 * ramp * (index + 1)], axis=1) / 4
        sf.write(folder / f"{source}.wav", stem, RATE, subtype="FLOAT")
    sf.write(folder / "mixture.wav", np.zeros((frames, 2), np.float32), RATE, subtype="FLOAT")
    sources, tracks = find_tracks(tmp_path / "data", "train")
    excerpts = Excerpts(tracks, sources, length=1000, channels=2, shift=200, remix=0.5)
    batch = excerpts.batch(seed=3, step=7, items=range(4))
    assert batch.shape == (4, 4, 2, 1000)
    assert torch.equal(batch[2], excerpts.example(3, 7, 2))
    assert not torch.equal(batch[0], excerpts.example(3, 8, 0))
    for example in batch:
        for index, audio in enumerate(example):
            left, right = audio[0].double(), audio[1].double()
            ratio = left / right  # -2 unswapped, -0.5 swapped
            assert torch.allclose(ratio, ratio[0]) and float(ratio[0]) in (
                pytest.approx(-2.0),
                pytest.approx(-0.5),
            )
            louder = left if float(ratio[0].abs()) > 1 else right
            step = float(louder[1] - louder[0])  # gain * (index+1) / (4 * frames), signed
            gain = step * 4 * frames / (index + 1)
            assert GAIN_RANGE[0] - 1e-4 <= abs(gain) <= GAIN_RANGE[1] + 1e-4
    excerpts.close()


def test_two_processes_agree_and_match_one(toy_dataset, toy_config, tmp_path):
    """torchrun with 2 CPU processes (gloo): both end with the same weights, and those equal a
    1-process run with the same global batch up to float rounding."""
    options = ["--config", str(toy_config), "--steps", "4", "--batch-size", "4", "-q"]
    options += ["--lr", "1e-3", "--save-every", "4", "--log-every", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--standalone", "-m", "htsep", "train", str(toy_dataset)]
    # torchrun leaves a torchelastic_* folder in the temporary directory: keep it in tmp_path.
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    # A session of its own, so that a hang kills the workers too, not only torchrun.
    job = subprocess.Popen(
        [*command, "--out", str(tmp_path / "two"), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = job.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise
    assert job.returncode == 0, stderr[-3000:]
    end = _metrics(tmp_path / "two")[-1]
    assert end["event"] == "end" and len(end["rank_digests"]) == 2
    assert end["rank_digests"][0] == end["rank_digests"][1]
    single = CliRunner().invoke(
        app, ["train", str(toy_dataset), "--out", str(tmp_path / "one"), *options]
    )
    assert single.exit_code == 0, single.output
    two, one = load_file(tmp_path / "two" / MODEL_FILE), load_file(tmp_path / "one" / MODEL_FILE)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


def test_cli_refuses_to_reuse_or_resume_the_wrong_folder(toy_dataset, toy_config, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    base = ["train", str(toy_dataset), "--out", str(run), "--config", str(toy_config), "-q"]
    assert runner.invoke(app, [*base, "--steps", "1"]).exit_code == 0
    again = runner.invoke(app, [*base, "--steps", "1"])
    assert again.exit_code == 2 and "--resume" in again.output
    nothing = runner.invoke(app, [*base[:3], str(tmp_path / "empty"), "--resume", "-q"])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output
    resumed = runner.invoke(app, ["train", str(toy_dataset), "--out", str(run), "--resume",
                                  "--steps", "2", "-q"])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in _metrics(run) if "loss" in r] == [1, 2]
    changed = runner.invoke(app, ["train", str(toy_dataset), "--out", str(run), "--resume",
                                  "--steps", "3", "--lr", "1", "--seed", "0", "-q"])  # fmt: skip
    assert changed.exit_code == 2
    assert "--lr, --seed cannot change" in changed.output
    assert [r["step"] for r in _metrics(run) if "loss" in r] == [1, 2]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "huge"], "neither a named size"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--init", "x.th", "--config", "tiny"], "exclude each other"),
        (["--batch-size", "3", "--lr", "-1"], "--lr must be positive"),
        (["-j", "-1"], "--jobs must be in 0..1024"),
        (["-j", "99999"], "--jobs must be in 0..1024"),  # torch segfaulted
        (["--seed", "-1"], "--seed must be in 0..2^63-1"),
        (["--seed", str(2**64)], "--seed must be in 0..2^63-1"),
        # Found by a hostile audit (2026-12-07): "--config .: neither a named size ...", a
        # batch that took memory until killed, a run that could never end.
        (["--config", ""], "--config: empty value"),
        (["--config", " "], "--config: empty value"),
        (["--init", "", "--config", "tiny"], "--init: empty value"),
        (["--batch-size", "100000"], "--batch-size must be at most 1024"),
        (["--steps", "99999999999999999999"], "--steps must be at most 1000000000"),
        (["--save-every", str(10**10)], "--save-every must be at most 1000000000"),
    ],
)
def test_cli_bad_options(toy_dataset, tmp_path, args, message):
    result = CliRunner().invoke(
        app, ["train", str(toy_dataset), "--out", str(tmp_path / "r"), "-q", *args]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("htsep: error:") and message in lines[0]
    assert not (tmp_path / "r").exists()


def test_cli_bad_dataset(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    result = CliRunner().invoke(
        app, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "r"), "-q"]
    )
    assert result.exit_code == 1
    assert result.output == (
        f"htsep: error: {tmp_path / 'data' / 'train'}: no mixture.wav or mixture.flac in track a\n"
    )
    assert not (tmp_path / "r" / STATE_FILE).exists()


def test_named_and_file_configs(tmp_path):
    """--config htdemucs is the released architecture (parameter count from demucs itself);
    a config file may use htsep's own groups instead of demucs's keywords."""
    released = build_model(TrainOptions(dataset="d", config="htdemucs"), SOURCES, 44100, 2)
    oracle = reference.build(reference.SOURCES_4, reference.RELEASED)
    count = sum(p.numel() for p in released.parameters())
    assert count == sum(p.numel() for p in oracle.parameters())
    path = tmp_path / "groups.yaml"
    path.write_text(
        "segment: 0.5\nstft: {n_fft: 256}\n"
        "conv: {channels: 4, depth: 2, dconv_compress: 4}\ntransformer: {layers: 1, heads: 2}\n"
    )
    model = build_model(TrainOptions(dataset="d", config=str(path)), ["a", "b"], 8000, 1)
    assert model.sources == ["a", "b"] and model.audio_channels == 1  # the dataset's
    assert model.sample_rate == 8000
    assert model.config.conv.channels == 4 and model.config.stft.n_fft == 256
    assert model.config.segment == Fraction(1, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("conv: {channels: 4, wings: 2}\n")
    with pytest.raises(UsageError, match="bad.yaml: invalid option"):
        build_model(TrainOptions(dataset="d", config=str(bad)), ["a"], 8000, 1)


@pytest.mark.parametrize(
    "environment,message",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': expected a whole number"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x': expected a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1'"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "without MASTER_ADDR and MASTER_PORT"),
        # A rank outside the world waited forever for its peers.
        (
            {"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "RANK=5 is not below WORLD_SIZE=2",
        ),
    ],
)
def test_torchrun_variables_are_checked_before_any_work(
    toy_dataset, toy_config, tmp_path, monkeypatch, environment, message
):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "r"
    args = ["train", str(toy_dataset), "--out", str(run), "--config", str(toy_config), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("htsep: error: ") and message in result.output
    assert len(result.output.splitlines()) == 1
    assert not run.exists()


def test_an_empty_world_size_is_refused_as_shard_auto_refuses_it(
    toy_dataset, toy_config, tmp_path, monkeypatch
):
    """One reading of launcher variables for --shard auto and train: empty is a script's unset
    variable, not "one process"."""
    from htsep.batch import shard_from_environment

    monkeypatch.setenv("WORLD_SIZE", "")
    args = ["train", str(toy_dataset), "--out", str(tmp_path / "r"), "--config", str(toy_config)]
    result = CliRunner().invoke(app, [*args, "-q"])
    assert result.exit_code == 2
    assert (
        result.output
        == "htsep: error: train: WORLD_SIZE is empty (an unset variable in a script?)\n"
    )
    with pytest.raises(UsageError, match="WORLD_SIZE is empty"):
        shard_from_environment({"WORLD_SIZE": "", "RANK": "0"})


def _run_json(toy_dataset, toy_config) -> str:
    """The run.json a run of these options writes."""
    return json.dumps(dataclasses.asdict(_options(toy_dataset, toy_config)), indent=2)


@pytest.mark.parametrize(
    "names",
    [
        ("model.safetensors",),
        ("metrics.jsonl",),
        ("run.json",),  # another tool's file of that common name: not a run's options
        ("run.json", "metrics.jsonl", "model.safetensors"),
        ("htsep run.json", "model.safetensors"),  # a run writes a model only after a state.pt
    ],
)
def test_a_run_never_replaces_files_it_did_not_write(toy_dataset, toy_config, tmp_path, names):
    """A folder holding a model.safetensors, metrics.jsonl or run.json of the user's is not a
    run that failed before its first save: the run would have replaced them."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in names:
        ours = name.startswith("htsep ")
        text = _run_json(toy_dataset, toy_config) if ours else "mine\n"
        (folder / name.removeprefix("htsep ")).write_text(text)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["train", str(toy_dataset), "--out", str(folder), "--config", str(toy_config)]
    result = CliRunner().invoke(app, [*args, "--steps", "1", "-q"])
    assert result.exit_code == 2 and "which a run would replace" in result.output, result.output
    assert len(result.output.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_run_that_saved_no_step_starts_over(toy_dataset, toy_config, tmp_path):
    """A run that failed before its first checkpoint left run.json (and maybe metrics): the
    folder could then neither start (\"already holds a run\") nor resume (no state.pt)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(_run_json(toy_dataset, toy_config))
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    args = ["train", str(toy_dataset), "--out", str(run), "--config", str(toy_config), "-q"]
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 2 and "nothing to resume" in resumed.output
    started = CliRunner().invoke(app, [*args, "--steps", "1"])
    assert started.exit_code == 0, started.output
    assert [r["step"] for r in _metrics(run) if "loss" in r] == [1]
    assert json.loads((run / "run.json").read_text())["steps"] == 1


@pytest.mark.parametrize("kind", ["empty", "file", "under a file", "bad metrics"])
def test_unusable_run_folders_are_one_line(toy_dataset, toy_config, tmp_path, kind):
    (tmp_path / "file").write_text("mine")
    out = {
        "empty": "",
        "file": str(tmp_path / "file"),
        "under a file": str(tmp_path / "file" / "x"),
    }
    if kind == "bad metrics":  # a real run's log, then overwritten
        out[kind] = str(tmp_path / "run")
        first = ["train", str(toy_dataset), "--out", out[kind], "--config", str(toy_config)]
        assert CliRunner().invoke(app, [*first, "--steps", "1", "-q"]).exit_code == 0
        (tmp_path / "run" / "metrics.jsonl").write_text("not json\n")
    args = ["train", str(toy_dataset), "--out", out[kind], "-q"]
    if kind == "bad metrics":
        args += ["--resume", "--steps", "2"]
    else:
        args += ["--config", str(toy_config)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (1, 2), result.output
    assert len(result.output.splitlines()) == 1 and result.output.startswith("htsep: error:")
    assert "Traceback" not in result.output
    assert kind != "bad metrics" or "not a metrics log" in result.output
    assert (tmp_path / "file").read_text() == "mine"


def test_a_bad_products_variable_stops_training_before_any_step(
    toy_dataset, toy_config, tmp_path, monkeypatch
):
    from htsep.model import kernels

    monkeypatch.setenv(kernels.PRODUCTS_VARIABLE, "garbage")
    kernels.cpu_products.cache_clear()
    try:
        run = tmp_path / "r"
        args = ["train", str(toy_dataset), "--out", str(run), "--config", str(toy_config), "-q"]
        result = CliRunner().invoke(app, args)
    finally:
        monkeypatch.delenv(kernels.PRODUCTS_VARIABLE)
        kernels.cpu_products.cache_clear()
    assert result.exit_code == 2 and "HTSEP_CPU_PRODUCTS" in result.output
    assert not run.exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_an_empty_dataset_argument_is_a_usage_error(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    extra = ["--out", str(tmp_path / "r")] if command == "train" else ["-n", "htsep-tiny"]
    result = CliRunner().invoke(app, [command, "", *extra, "-q"])
    assert result.exit_code == 2, result.output
    assert (
        result.output
        == "htsep: error: DATASET is an empty string (an unset variable in a script?)\n"
    )


def test_a_second_run_on_a_busy_folder_is_refused(toy_dataset, toy_config, tmp_path):
    """Two `htsep train --out run` at once both trained, interleaving their checkpoints and
    writing every metrics line twice. The run folder is locked for the whole run (flock on
    the folder: nothing is left behind, and kill -9 releases it)."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = ["train", str(toy_dataset), "--out", str(run), "--config", str(toy_config), "-q"]
    first = subprocess.Popen(
        [sys.executable, "-m", "htsep", *args, "--steps", "100000", "--save-every", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / STATE_FILE).exists():  # the first checkpoint: training has begun
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for second_args in ([*args, "--steps", "1"], [*args[:4], "--resume", "--steps", "2", "-q"]):
            # A fresh start is refused by the state.pt already (exit 2 either way); a resume
            # got past that check and trained beside the first run.
            second = CliRunner().invoke(app, second_args)
            assert second.exit_code == 2, second.output
            assert len(second.output.splitlines()) == 1, second.output
        assert "another htsep train is running in this folder" in second.output
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 released the lock: the run resumes.
    saved = torch.load(run / STATE_FILE, weights_only=False)["step"]
    resumed = CliRunner().invoke(app, [*args[:4], "--resume", "--steps", str(saved + 1), "-q"])
    assert resumed.exit_code == 0, resumed.output
    steps = [r["step"] for r in _metrics(run) if "loss" in r]
    assert steps == sorted(set(steps)), steps


def test_a_failed_run_leaves_no_folder_it_made(toy_dataset, tmp_path):
    config = tmp_path / "other-rate.yaml"
    config.write_text(json.dumps({**TOY, "samplerate": RATE * 2}))
    (tmp_path / "kept").mkdir()
    run = tmp_path / "kept" / "deep" / "er" / "run"  # its parents made by the run too
    args = ["train", str(toy_dataset), "--out", str(run), "--config", str(config), "-q"]
    result = CliRunner().invoke(app, [*args, "--steps", "1"])
    assert result.exit_code == 2 and "resample the dataset" in result.output, result.output
    assert list((tmp_path / "kept").iterdir()) == []


def test_a_diverged_run_stops_in_one_line_and_keeps_its_last_checkpoint(
    toy_dataset, toy_config, tmp_path
):
    """--lr 1e30: NaN losses went into metrics.jsonl (not JSON) until the export of the
    model, whose NaN weights htsep's own loader refused, failed the run."""
    run = tmp_path / "run"
    args = ["train", str(toy_dataset), "--out", str(run), "--config", str(toy_config)]
    options = ["--lr", "1e30", "--steps", "6", "--save-every", "1", "--log-every", "1", "-q"]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert "training diverged at step" in line and "lower --lr" in line, line
    diverged = int(line.split("at step ")[1].split()[0])

    def refuse(constant):
        raise ValueError(constant)

    records = [json.loads(text, parse_constant=refuse) for text in (run / METRICS).open()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, diverged))
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == diverged - 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_an_interruption_before_the_first_checkpoint_does_not_offer_resume(
    toy_dataset, toy_config, tmp_path, monkeypatch
):
    from htsep import train

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "run", interrupted)
    run = tmp_path / "run"
    args = ["train", str(toy_dataset), "--out", str(run), "--config", str(toy_config), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    assert "--resume" not in result.output and "starts it over" in result.output
    run.mkdir()
    (run / "state.pt").write_bytes(b"")  # a checkpoint there: resuming is the way on
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130 and "continue the run with --resume" in result.output


@pytest.fixture(scope="module")
def saved_run(toy_dataset, toy_config, tmp_path_factory) -> Path:
    """A run folder with one saved step, to copy and spoil."""
    run = tmp_path_factory.mktemp("saved") / "run"
    _train(_options(toy_dataset, toy_config, steps=1, save_every=1), run)
    return run


def _spoil_state(change):
    def spoil(run: Path) -> None:
        state = torch.load(run / "state.pt", weights_only=True)
        torch.save(change(state), run / "state.pt")

    return spoil


def _spoil_metrics(run: Path) -> None:
    with (run / "metrics.jsonl").open("a") as log:
        log.write('{"step": "x"}\n')


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def _first_weight_shrunk(state: dict) -> dict:
    model = dict(state["model"])
    model[next(iter(model))] = torch.zeros(1)
    return {**state, "model": model}


@pytest.mark.parametrize(
    "spoil",
    [
        _spoil_state(lambda state: _without(state, "config")),
        _spoil_state(lambda state: _without(state, "step")),
        _spoil_state(lambda state: {**state, "step": -100}),
        _spoil_state(lambda state: {**state, "step": "abc"}),
        _spoil_state(lambda state: {**state, "step": True}),
        _spoil_state(lambda state: [state]),
        _spoil_state(_first_weight_shrunk),
        _spoil_state(lambda state: {**state, "optimizer": {"state": {}}}),
        _spoil_metrics,
    ],
    ids=[
        "no config",
        "no step",
        "negative step",
        "text step",
        "bool step",
        "a list",
        "wrong weight shape",
        "optimizer without groups",
        "text step in metrics",
    ],  # fmt: skip
)
def test_a_spoiled_run_resumes_as_one_line_and_keeps_its_files(
    saved_run, toy_dataset, tmp_path, spoil
):
    """A state.pt or metrics.jsonl that loads but is not what a run saves: tracebacks
    (KeyError, RuntimeError, TypeError...) before, and a negative step emptied the log."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    spoil(run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    args = ["train", str(toy_dataset), "--out", str(run), "--resume", "--steps", "3"]
    result = CliRunner().invoke(app, [*args, "-q"])
    assert result.exit_code == 2, result.output
    assert len(result.output.splitlines()) == 1 and result.output.startswith("htsep: error:")
    assert "cannot resume" in result.output or "not a metrics log" in result.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def _htsep_with_file_size_limit(limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m htsep ARGS`` in a process whose files cannot grow past ``limit`` bytes
    (RLIMIT_FSIZE): a write then fails as on a full disk (EFBIG where ENOSPC would be),
    without a small file system to mount."""
    import resource

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "htsep", *args],
        preexec_fn=limit_files,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_a_checkpoint_that_cannot_be_saved_is_one_line(toy_dataset, toy_config, tmp_path):
    """A full disk during torch.save was a 60-line traceback ending in "RuntimeError: [enforce
    fail at inline_container.cc:672] . unexpected pos": now one line naming the run folder and
    the reason, exit 1, and no temporary left in the folder."""
    run = tmp_path / "run"
    args = ["train", str(toy_dataset), "--out", str(run), "--config", str(toy_config), "-q"]
    result = _htsep_with_file_size_limit(100_000, *args, "--steps", "3", "--log-every", "1")
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"htsep: error: {run}: cannot write state.pt: File too large\n"
    assert sorted(path.name for path in run.iterdir()) == ["metrics.jsonl", "run.json"]


def test_a_failed_metrics_write_leaves_a_log_the_run_resumes_from(
    toy_dataset, toy_config, tmp_path
):
    """A metrics record written in pieces could be cut short by a full disk, and the torn line
    made the run impossible to resume ("not a metrics log"). A record is one write, and a
    failed one is cut back off the log."""
    run = tmp_path / "run"
    options = _options(toy_dataset, toy_config, steps=3)
    _train(options, run)
    # A log longer than state.pt, so that the limit stops the next record and not a checkpoint;
    # without the end record, which the resumed run drops.
    records = [r for r in _metrics(run) if r.get("event") != "end"]
    records.append({"step": 0, "note": "x" * 400_000})
    (run / METRICS).write_text("".join(json.dumps(record) + "\n" for record in records))
    before = (run / METRICS).read_bytes()
    args = ["train", str(toy_dataset), "--out", str(run), "--resume", "--steps", "6", "-q"]
    result = _htsep_with_file_size_limit(len(before) + 20, *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"htsep: error: {run}: cannot write metrics.jsonl: File too large\n"
    assert (run / METRICS).read_bytes() == before
    assert not [path.name for path in run.iterdir() if path.name.startswith(".")]
    _train(dataclasses.replace(options, steps=6), run, resume=True)
    assert [r["step"] for r in _metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_metrics_line_is_dropped_on_resume(toy_dataset, toy_config, tmp_path):
    """A run killed (or out of disk) in the middle of a record left half a line at the end of
    metrics.jsonl: dropped on resume (it came after the last checkpoint). A line that is not
    JSON anywhere else is not a torn record, and is still refused."""
    run = tmp_path / "run"
    options = _options(toy_dataset, toy_config, steps=3)
    _train(options, run)
    with open(run / METRICS, "a") as log:
        log.write('{"step": 4, "lo')
    _train(dataclasses.replace(options, steps=4), run, resume=True)
    assert [r["step"] for r in _metrics(run) if "loss" in r] == [1, 2, 3, 4]
    lines = (run / METRICS).read_text().splitlines(keepends=True)
    (run / METRICS).write_text("".join([lines[0], '{"step": 2, "lo\n', *lines[1:]]))
    with pytest.raises(UsageError, match="a line is not JSON"):
        _train(dataclasses.replace(options, steps=5), run, resume=True)


def test_a_run_removes_the_temporaries_a_killed_run_left(toy_dataset, toy_config, tmp_path):
    """kill -9 between torch.save and the rename left a .state.pt.<owner>.<hex>.tmp (hundreds
    of MB with a big model) that no later run removed. A run removes, once it holds the
    folder's lock, the temporaries whose owner no longer runs; never a live process's."""
    from htsep.files import create_temporary

    run = tmp_path / "run"
    options = _options(toy_dataset, toy_config, steps=1)
    _train(options, run)
    make = "import sys, htsep.files as f; print(f.create_temporary(sys.argv[1]))"
    made = subprocess.run(
        [sys.executable, "-c", make, str(run / STATE_FILE)],
        capture_output=True,
        text=True,
        check=True,
    )
    killed = Path(made.stdout.strip())  # its owner has ended without removing it
    live = create_temporary(run / MODEL_FILE)  # this process's: it still runs
    try:
        assert killed.parent == run and killed.exists()
        _train(dataclasses.replace(options, steps=2), run, resume=True)
        assert not killed.exists()
        assert live.exists()
    finally:
        live.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "text,phrase",
    [
        ("channels: 4\nchannels: 8\n", "is given twice"),
        ("[" * 5000 + "]" * 5000, "recursion"),
        # htsep's layout: a fraction over zero was a ZeroDivisionError traceback, and a power
        # of ten in the billions computed a billion-digit number for hours.
        ('conv: {channels: 4}\nsegment: "1/0"\n', "invalid option"),
        ('conv: {channels: 4}\nsegment: "1e999999999"\n', "expected seconds"),
    ],
)
def test_unreadable_config_files_are_one_line(toy_dataset, tmp_path, text, phrase):
    """A key given twice was taken silently (the last won); YAML nested too deep for the
    parser was a RecursionError traceback."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    args = ["train", str(toy_dataset), "--out", str(tmp_path / "run"), "--config", str(config)]
    result = CliRunner().invoke(app, [*args, "--steps", "1", "-q"])
    assert result.exit_code == 2, result.output
    assert len(result.output.splitlines()) == 1 and phrase in result.output, result.output
    assert not (tmp_path / "run").exists()
