"""End to end: the `htsep separate` command against the `demucs` command on the same
checkpoint files, plus the smoke test and the batch behaviour."""

import errno
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from helpers import RATE, htsep, write_clip

import reference


def read(path: Path) -> tuple[np.ndarray, int]:
    return sf.read(path, dtype="float32", always_2d=True)


def _same_stems_as_demucs(tmp_path: Path, repo: Path, name: str, *options: str) -> None:
    """`htsep` and `demucs` with the same repo, ``options`` and `--shifts 0 --float32` give
    the same stems within 1e-6 of full scale, on a multi-chunk clip."""
    clip = tmp_path / "clip.wav"
    write_clip(clip, 4.3)
    demucs_out, htsep_out = tmp_path / "demucs", tmp_path / "htsep"
    common = ["--repo", str(repo), "-n", name, "--shifts", "0", "--float32", *options]
    done = subprocess.run(
        [sys.executable, "-m", "demucs", *common, "-o", str(demucs_out), str(clip)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = htsep(*common, "-o", str(htsep_out), "-q", str(clip))
    assert result.exit_code == 0, result.output
    for stem in reference.SOURCES_4:
        ref, ref_rate = read(demucs_out / name / "clip" / f"{stem}.wav")
        ours, rate = read(htsep_out / name / "clip" / f"{stem}.wav")
        assert rate == ref_rate == RATE and ours.shape == ref.shape
        assert 0 < np.abs(ref).max() < 0.99  # nothing clipped: the comparison is exact
        assert np.abs(ours - ref).max() <= 1e-6, (stem, np.abs(ours - ref).max())


@pytest.mark.parametrize("name", ["aaaa0001", "mixbag"])
def test_same_stems_as_demucs(tmp_path, repo, name):
    """The same stems as demucs (as the README says): a single model and a weighted bag."""
    _same_stems_as_demucs(tmp_path, repo, name)


@pytest.mark.parametrize("options", [(), ("--segment", "1")], ids=["own", "segment-1"])
def test_bag_segment_same_stems_as_demucs(tmp_path, repo, options):
    """A bag whose own `segment` (1.2 s) is shorter than its members' (1.5 s): demucs gives
    each member that segment, so every chunk is zero-padded to 1.2 s in the network, not to
    the member's 1.5 s, also when --segment sets a shorter chunk."""
    bag_repo = tmp_path / "repo"
    shutil.copytree(repo, bag_repo)
    (bag_repo / "segbag.yaml").write_text(
        yaml.safe_dump(
            {
                "models": ["aaaa0001", "bbbb0002"],
                "weights": [[1.0, 0.5, 0.25, 1.0], [0.5, 1.0, 1.0, 0.25]],
                "segment": 1.2,
            }
        )
    )
    assert reference.SMALL["segment"] == Fraction(3, 2)  # longer than the bag's
    _same_stems_as_demucs(tmp_path, bag_repo, "segbag", *options)


def test_smoke_short_clip(tmp_path, repo):
    clip = tmp_path / "in" / "short clip.wav"
    mix = write_clip(clip, 1.7)
    out = tmp_path / "out"
    result = htsep("--repo", str(repo), "-n", "aaaa0001", "-o", str(out), "-q", str(clip))
    assert result.exit_code == 0, result.output
    folder = out / "aaaa0001" / "short clip"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{s}.wav" for s in reference.SOURCES_4
    )
    for path in folder.iterdir():
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.frames) == (RATE, 2, len(mix))
        assert info.format == "WAV" and info.subtype == "PCM_16"

    result = htsep(
        "--repo",
        str(repo),
        "-n",
        "aaaa0001",
        "-o",
        str(out),
        "-q",
        "--two-stems",
        "vocals",
        "--other-method",
        "minus",
        "--float32",
        "--clip-mode",
        "none",
        "--filename",
        "{track}.{stem}.{ext}",
        str(clip),
    )
    assert result.exit_code == 0, result.output
    vocals, _ = read(out / "aaaa0001" / "short clip.vocals.wav")
    minus, _ = read(out / "aaaa0001" / "short clip.minus_vocals.wav")
    assert sf.info(out / "aaaa0001" / "short clip.vocals.wav").subtype == "FLOAT"
    assert np.abs(vocals + minus - mix).max() <= 1e-5


def test_formats_flac_24_and_mp3(tmp_path, repo):
    clip = tmp_path / "song.wav"
    mix = write_clip(clip, 1.0)
    out = tmp_path / "out"
    args = ["--repo", str(repo), "-n", "aaaa0001", "-o", str(out), "-q", "--stems", "vocals"]
    assert htsep(*args, "--flac", "--int24", str(clip)).exit_code == 0
    info = sf.info(out / "aaaa0001" / "song" / "vocals.flac")
    assert (info.format, info.subtype, info.frames) == ("FLAC", "PCM_24", len(mix))
    assert htsep(*args, "--mp3", "--mp3-bitrate", "128", str(clip)).exit_code == 0
    info = sf.info(out / "aaaa0001" / "song" / "vocals.mp3")
    assert (info.format, info.samplerate, info.channels) == ("MP3", RATE, 2)
    assert sorted(p.name for p in (out / "aaaa0001" / "song").iterdir()) == [
        "vocals.flac",
        "vocals.mp3",
    ]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 192000])
def test_any_rate_mono_and_length(tmp_path, repo, rate):
    clip = tmp_path / "mono.wav"
    mix = write_clip(clip, 0.6, rate=rate, channels=1)
    out = tmp_path / "out"
    result = htsep(
        "--repo",
        str(repo),
        "-n",
        "aaaa0001",
        "-o",
        str(out),
        "-q",
        "--stems",
        "bass,drums",
        str(clip),
    )
    assert result.exit_code == 0, result.output
    stems = sorted(p.name for p in (out / "aaaa0001" / "mono").iterdir())
    assert stems == ["bass.wav", "drums.wav"]
    for stem in stems:
        info = sf.info(out / "aaaa0001" / "mono" / stem)
        assert (info.samplerate, info.channels, info.frames) == (rate, 1, len(mix))


def test_tiny_and_silent_inputs(tmp_path, repo):
    for name, audio in [
        ("few", np.full((3, 2), 0.1, np.float32)),
        ("silence", np.zeros((RATE, 2), np.float32)),
    ]:
        sf.write(tmp_path / f"{name}.wav", audio, RATE, subtype="FLOAT")
    out = tmp_path / "out"
    result = htsep(
        "--repo",
        str(repo),
        "-n",
        "aaaa0001",
        "-o",
        str(out),
        "-q",
        str(tmp_path / "few.wav"),
        str(tmp_path / "silence.wav"),
    )
    assert result.exit_code == 0, result.output
    # A constant input has no variance: normalized, the network sees zeros, and each stem is
    # its output times the standard deviation (0) plus the mean: the constant itself, exactly.
    for stem in reference.SOURCES_4:
        few, _ = read(out / "aaaa0001" / "few" / f"{stem}.wav")
        silent, _ = read(out / "aaaa0001" / "silence" / f"{stem}.wav")
        assert few.shape == (3, 2) and np.abs(few - 0.1).max() <= 1 / 32768  # 16-bit output
        assert silent.shape == (RATE, 2) and not silent.any()


def test_one_hot_bag_runs_only_the_member_needed(tmp_path, repo):
    """The one-hot bag's other members are not even readable: --two-stems vocals succeeds
    only because just the vocals member is loaded."""
    clip = tmp_path / "song.wav"
    write_clip(clip, 1.0)
    out = tmp_path / "out"
    result = htsep(
        "--repo",
        str(repo),
        "-n",
        "onehot",
        "-o",
        str(out),
        "-q",
        "--two-stems",
        "vocals",
        str(clip),
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "onehot" / "song").iterdir()) == [
        "no_vocals.wav",
        "vocals.wav",
    ]
    result = htsep(
        "--repo", str(repo), "-n", "onehot", "-o", str(out), "-q", "--overwrite", str(clip)
    )
    assert result.exit_code == 1  # all four stems need the unreadable members
    assert result.stderr == (
        f"htsep: error: {repo / 'dead0003.th'}: not a checkpoint (neither a torch file nor "
        "safetensors)\n"
    )


def test_batch_folder_glob_failures_json_and_summary(tmp_path, repo):
    music = tmp_path / "music"
    write_clip(music / "a.wav", 0.5)
    write_clip(music / "sub" / "b.flac", 0.5, subtype="PCM_16")
    (music / "notes.txt").write_text("not audio")
    (music / "broken.wav").write_text("not audio either")
    write_clip(tmp_path / "c.wav", 0.5)
    out = tmp_path / "out"
    result = htsep(
        "--repo",
        str(repo),
        "-n",
        "aaaa0001",
        "-o",
        str(out),
        "-q",
        "--json",
        "--stems",
        "vocals",
        str(music),
        str(tmp_path / "c*.wav"),
        str(tmp_path / "missing.wav"),
    )
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    by_input = {Path(r["input"]).name: r for r in records}
    assert set(by_input) == {"a.wav", "b.flac", "broken.wav", "c.wav", "missing.wav"}
    for good in ("a.wav", "b.flac", "c.wav"):
        record = by_input[good]
        assert record["status"] == "ok" and record["error"] is None
        assert record["sample_rate"] == RATE and record["duration"] == pytest.approx(0.5)
        # Both figures are rounded (speed to 0.01, seconds to 0.001): compare within that.
        seconds = record["seconds"]
        low, high = (record["duration"] / (seconds + d) for d in (0.0005, -0.0005))
        assert low - 0.005 <= record["times_real_time"] <= high + 0.005
        assert len(record["outputs"]) == 1
        assert Path(record["outputs"][0]).exists()
    for bad in ("broken.wav", "missing.wav"):
        assert by_input[bad]["status"] == "failed" and by_input[bad]["error"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("htsep: error:")]
    assert len(errors) == 2
    assert "3 separated, 0 skipped, 2 failed" in result.stderr
    assert not (out / "aaaa0001" / "broken").exists()


def test_existing_outputs_skip_and_overwrite(tmp_path, repo):
    clip = tmp_path / "song.wav"
    write_clip(clip, 0.5)
    out = tmp_path / "out"
    args = ["--repo", str(repo), "-n", "aaaa0001", "-o", str(out), "-q", "--json"]
    assert htsep(*args, str(clip)).exit_code == 0
    vocals = out / "aaaa0001" / "song" / "vocals.wav"
    vocals.write_bytes(b"my own edit")
    result = htsep(*args, str(clip))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        f"htsep: error: {clip}: {vocals.with_name('drums.wav')} exists (use --overwrite to "
        "replace it or --skip-existing to skip finished tracks)"
    )
    assert vocals.read_bytes() == b"my own edit"  # nothing a user had is overwritten
    result = htsep(*args, "--skip-existing", str(clip))
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "skipped"
    assert vocals.read_bytes() == b"my own edit"
    assert htsep(*args, "--overwrite", str(clip)).exit_code == 0
    assert sf.info(vocals).frames == 4000


@pytest.mark.parametrize(
    ("clip_mode", "failing"), [("rescale", "write"), ("clamp", "close")], ids=["write", "close"]
)
@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "fresh"])
def test_a_full_disk_at_the_second_stem_never_mixes_old_and_new_stems(
    tmp_path, repo, monkeypatch, clip_mode, failing, existing
):
    """--overwrite over an existing set, the disk full at the second stem (as its blocks are
    written, or as its file is closed): the old set stays whole, bytes unchanged, and no
    hidden file is left; else --skip-existing would take a mix of old and new stems for a
    finished track. Fresh outputs keep the stems finished before the failure."""
    clip = tmp_path / "song.wav"
    out = tmp_path / "out"
    args = ["--repo", str(repo), "-n", "aaaa0001", "-o", str(out), "-q", "--clip-mode", clip_mode]
    folder = out / "aaaa0001" / "song"
    old = {}
    if existing:
        write_clip(clip, 0.5, seed=1)
        assert htsep(*args, str(clip)).exit_code == 0
        old = {path.name: path.read_bytes() for path in folder.iterdir()}
        assert sorted(old) == sorted(f"{stem}.wav" for stem in reference.SOURCES_4)
    write_clip(clip, 0.5, seed=2)  # other samples: new stems differ from the old ones

    real = getattr(sf.SoundFile, failing)

    def full_disk(self, *rest):
        # The temporary of bass.wav, the second stem (not its staged float copy).
        if not self.closed and self.subtype != "FLOAT" and ".bass.wav." in os.fsdecode(self.name):
            if failing == "close":
                real(self, *rest)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *rest)

    monkeypatch.setattr(sf.SoundFile, failing, full_disk)
    result = htsep(*args, "--overwrite", str(clip))
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    assert not [path for path in out.rglob(".*")]  # no temporary or staging folder left
    left = {path.name: path.read_bytes() for path in folder.iterdir()}
    if existing:
        assert left == old
    else:  # drums (and, when closing in reverse, other and vocals) were put in place
        assert "bass.wav" not in left and left
        monkeypatch.setattr(sf.SoundFile, failing, real)
        assert htsep(*args, "--skip-existing", str(clip)).exit_code == 0
        done = {path.name: path.read_bytes() for path in folder.iterdir()}
        assert sorted(done) == sorted(f"{stem}.wav" for stem in reference.SOURCES_4)
        assert {name: done[name] for name in left} == left  # kept, not written again


def test_shard_slices_cover_the_inputs_once(tmp_path, repo):
    for index in range(5):
        write_clip(tmp_path / "in" / f"t{index}.wav", 0.3, seed=index)
    seen = []
    for k in (1, 2, 3):
        result = htsep(
            "--repo",
            str(repo),
            "-n",
            "aaaa0001",
            "-o",
            str(tmp_path / "out"),
            "-q",
            "--json",
            "--stems",
            "bass",
            "--shard",
            f"{k}/3",
            str(tmp_path / "in"),
        )
        assert result.exit_code == 0, result.output
        seen += [Path(json.loads(line)["input"]).name for line in result.stdout.splitlines()]
    assert sorted(seen) == [f"t{i}.wav" for i in range(5)]


def test_same_seed_same_bytes(tmp_path, repo):
    clip = tmp_path / "song.wav"
    write_clip(clip, 1.0)
    digests = []
    for run, seed in enumerate(["3", "3", "4"]):
        out = tmp_path / f"out{run}"
        result = htsep(
            "--repo",
            str(repo),
            "-n",
            "aaaa0001",
            "-o",
            str(out),
            "-q",
            "--shifts",
            "2",
            "--seed",
            seed,
            "--stems",
            "drums",
            str(clip),
        )
        assert result.exit_code == 0
        digests.append((out / "aaaa0001" / "song" / "drums.wav").read_bytes())
    assert digests[0] == digests[1] and digests[0] != digests[2]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_m4a_input_through_ffmpeg(tmp_path, repo):
    wav = tmp_path / "src.wav"
    mix = write_clip(wav, 1.0, subtype="PCM_16")
    m4a = tmp_path / "song.m4a"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True, timeout=60
    )
    out = tmp_path / "out"
    result = htsep(
        "--repo", str(repo), "-n", "aaaa0001", "-o", str(out), "-q", "--stems", "vocals", str(m4a)
    )
    assert result.exit_code == 0, result.output
    info = sf.info(out / "aaaa0001" / "song" / "vocals.wav")
    assert info.samplerate == RATE and info.channels == 2
    assert abs(info.frames - len(mix)) <= 2048  # AAC pads with encoder delay frames


def test_folder_trees_keep_their_layout(tmp_path, repo):
    album = tmp_path / "album"
    for index, disc in enumerate(["CD1", "CD2"]):
        write_clip(album / disc / "01.wav", 0.4, seed=index)
    write_clip(tmp_path / "single.wav", 0.4, seed=5)
    out = tmp_path / "out"
    args = ["--repo", str(repo), "-n", "aaaa0001", "-q", "--stems", "vocals", "-o", str(out)]
    result = htsep(*args, str(album), str(tmp_path / "single.wav"))
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.wav"))
    assert written == [
        "aaaa0001/CD1/01/vocals.wav",
        "aaaa0001/CD2/01/vocals.wav",
        "aaaa0001/single/vocals.wav",
    ]
    # {folder} places it in the template; a file named directly has the folder ".".
    result = htsep(*args, "--filename", "{folder}/{track}-{stem}.{ext}", str(album))
    assert result.exit_code == 0, result.output
    assert (out / "aaaa0001" / "CD1" / "01-vocals.wav").is_file()
    assert (out / "aaaa0001" / "CD2" / "01-vocals.wav").is_file()
