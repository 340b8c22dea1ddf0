"""Faults: SIGTERM, a second Ctrl-C and kill -9 leave nothing half-written, and a later run over
the same folder removes what a killed run left and completes the batch with the same bytes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import htsep, write_clip

from htsep import files

MODEL = ["-n", "aaaa0001", "-q"]
TRACKS = ("one", "two", "three")
SECONDS = 12.0


def _hidden(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def _stems(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def batch(tmp_path_factory, repo):
    """Three inputs and the stems of one uninterrupted run."""
    folder = tmp_path_factory.mktemp("faults")
    inputs = [folder / "in" / f"{name}.wav" for name in TRACKS]
    for seed, path in enumerate(inputs):
        write_clip(path, SECONDS, seed=seed)
    clean = folder / "clean"
    result = htsep("--repo", str(repo), *MODEL, "-o", str(clean), *map(str, inputs))
    assert result.exit_code == 0, result.output
    return repo, inputs, _stems(clean)


def _start(repo: Path, inputs: list[Path], out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "htsep", "separate", "--repo", str(repo), *MODEL]
    return subprocess.Popen(
        [*command, "-o", str(out), *map(str, inputs)], stderr=subprocess.PIPE, text=True
    )


def _wait_for(process: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """Poll until ``condition()``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the moment never came")


def _moment(out: Path, moment: str):
    model = out / "aaaa0001"

    def staging() -> bool:
        return any(p.name.startswith(".htsep-") for p in model.glob("*/.*"))

    def first_stem() -> bool:
        return any(model.glob("one/*.wav"))

    def second_track() -> bool:
        return any(model.glob("two/.*"))

    return {"staging": staging, "first stem": first_stem, "second track": second_track}[moment]


@pytest.mark.parametrize("moment", ["staging", "first stem", "second track"])
def test_kill_9_then_skip_existing_completes_the_batch_identically(batch, tmp_path, moment):
    repo, inputs, clean = batch
    out = tmp_path / "out"
    process = _start(repo, inputs, out)
    reached = _wait_for(process, _moment(out, moment))
    process.kill()
    process.wait(timeout=60)
    assert reached, f"the run ended before the moment: {process.stderr.read()}"
    result = htsep(
        "--repo", str(repo), *MODEL, "-o", str(out), "--skip-existing", *map(str, inputs)
    )
    assert result.exit_code == 0, result.output
    assert _hidden(out) == []
    assert _stems(out) == clean


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "two Ctrl-C"])
def test_sigterm_and_a_second_ctrl_c_leave_nothing_behind(batch, tmp_path, how):
    """SIGHUP (a closed terminal or ssh session) killed the process and left its staging
    folder and decoded temporaries: it stops the run as SIGTERM does."""
    repo, inputs, clean = batch
    out = tmp_path / "out"
    process = _start(repo, inputs, out)
    assert _wait_for(process, _moment(out, "staging"))
    if how in ("SIGTERM", "SIGHUP"):
        process.send_signal(getattr(signal, how))
    else:
        process.send_signal(signal.SIGINT)
        time.sleep(0.01)
        process.send_signal(signal.SIGINT)
    code = process.wait(timeout=60)
    errors = process.stderr.read()
    assert code == {"SIGTERM": 143, "SIGHUP": 129}.get(how, 130), errors
    assert "Traceback" not in errors
    assert _hidden(out) == []
    for name, content in _stems(out).items():  # whatever was finished is complete
        assert content == clean[name]


def test_signals_ignored_at_start_stay_ignored(batch, tmp_path):
    """Under nohup (SIGHUP ignored) or as a script's background job (SIGINT ignored) the run
    must not stop on them: only signals it was started to receive stop it."""
    repo, inputs, clean = batch
    out = tmp_path / "out"

    def ignore() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    command = [sys.executable, "-m", "htsep", "separate", "--repo", str(repo), *MODEL]
    process = subprocess.Popen(
        [*command, "-o", str(out), *map(str, inputs[:1])],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore,
    )
    assert _wait_for(process, _moment(out, "staging"))
    process.send_signal(signal.SIGHUP)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, process.stderr.read()
    assert _hidden(out) == []
    assert _stems(out) == {name: content for name, content in clean.items() if "/one/" in name}


@pytest.mark.parametrize("stderr", ["closed", "full disk", "reader gone"])
def test_a_failing_standard_error_loses_messages_not_work(batch, tmp_path, stderr):
    """Standard error at /dev/full exited 120 with no stems, closed (2>&-) or a pipe whose
    reader left exited 1 with no stems: messages are lost, the batch is not."""
    repo, inputs, clean = batch
    out = tmp_path / "out"
    command = [sys.executable, "-m", "htsep", "separate", "--repo", str(repo), "-n", "aaaa0001"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # any write gets EPIPE
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        done = subprocess.run(
            [*command, "-o", str(out), *map(str, inputs[:2])],
            stderr={"closed": subprocess.DEVNULL, "full disk": full, "reader gone": write_end}[
                stderr
            ],
            preexec_fn=(lambda: os.close(2)) if stderr == "closed" else None,
            timeout=300,
        )
    finally:
        os.close(write_end)
        os.close(full)
    assert done.returncode == 0
    assert _hidden(out) == []
    assert _stems(out) == {n: c for n, c in clean.items() if "/one/" in n or "/two/" in n}


def test_a_later_run_removes_stale_temporaries_but_not_live_ones(batch, tmp_path):
    repo, inputs, clean = batch
    folder = tmp_path / "out" / "aaaa0001" / "one"
    folder.mkdir(parents=True)
    # A process that made a temporary and a staging folder, then died without removing them.
    code = (
        "import sys; from htsep import files; "
        "files.create_temporary(sys.argv[1] + '/vocals.wav'); "
        "files.StagingFolder(sys.argv[1]); "
        "files.create_temporary(sys.argv[1] + '/model.th', suffix='.part')"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    stale = _hidden(folder)
    assert len(stale) == 3
    live = files.create_temporary(folder / "drums.wav")  # this process is alive
    result = htsep("--repo", str(repo), *MODEL, "-o", str(tmp_path / "out"), str(inputs[0]))
    assert result.exit_code == 0, result.output
    assert _hidden(folder) == [live.name]
    live.unlink()
    assert {k: v for k, v in clean.items() if k.startswith("aaaa0001/one/")} == _stems(
        tmp_path / "out"
    )


@pytest.mark.parametrize("rerun", [["--skip-existing"], []])
def test_a_finished_tracks_stale_staging_folder_is_removed_and_never_searched(
    batch, tmp_path, rerun
):
    """kill -9 after a track's last stem was placed left its staging folder, which no later
    run removed (the track was skipped, or failed with "exists"), and a folder search took
    the staged stems inside it for tracks."""
    repo, inputs, clean = batch
    out = tmp_path / "out"
    first = htsep("--repo", str(repo), *MODEL, "-o", str(out), str(inputs[0]))
    assert first.exit_code == 0, first.output
    track = out / "aaaa0001" / "one"
    code = (
        "import shutil, sys; from htsep import files; "
        "staging = files.StagingFolder(sys.argv[1]); "
        "shutil.copy(sys.argv[1] + '/vocals.wav', str(staging.path) + '/vocals.wav')"
    )
    subprocess.run([sys.executable, "-c", code, str(track)], check=True)  # then it died
    (staging,) = _hidden(out)
    assert (out / staging / "vocals.wav").is_file()
    searched = htsep("--repo", str(repo), *MODEL, "-o", str(tmp_path / "again"), str(out))
    assert searched.exit_code == 0, searched.output
    made = [str(p.relative_to(tmp_path / "again")) for p in (tmp_path / "again").rglob("*")]
    assert len([name for name in made if name.endswith("vocals.wav")]) == 4  # the 4 stems
    assert not [name for name in made if ".htsep-" in name]
    result = htsep("--repo", str(repo), *MODEL, "-o", str(out), *rerun, str(inputs[0]))
    assert result.exit_code == (0 if rerun else 1), result.output
    assert _hidden(out) == []


def test_a_dead_owner_is_proved_only_on_this_machine(tmp_path):
    folder = tmp_path
    tag = files.owner_tag()
    other_host = "h00000000" + tag[9:]
    other_pid = tag.split("p")[0] + "p" + str(2**22 + 1) + "s1"
    for owner in (other_host, other_pid):
        (folder / f".song.wav.{owner}.0123abcd.tmp").write_bytes(b"x")
    assert files.remove_stale(folder) == [folder / f".song.wav.{other_pid}.0123abcd.tmp"]
    assert os.listdir(folder) == [f".song.wav.{other_host}.0123abcd.tmp"]


def test_a_process_in_another_pid_namespace_is_never_taken_for_dead(tmp_path):
    """A run inside `unshare --pid` (a container or sandbox sharing the host name) is pid 1
    or so there: a run outside found no such process and removed its live staging folder."""
    tag = files.owner_tag()
    head, namespace_and_rest = tag.split("n", 1)
    namespace = namespace_and_rest[:8]
    other = "0" * 8 if namespace != "0" * 8 else "1" * 8
    dead_pid = f"p{2**22 + 1}s1"
    ours, theirs = f"{head}n{namespace}{dead_pid}", f"{head}n{other}{dead_pid}"
    for owner in (ours, theirs):
        (tmp_path / f".htsep-{owner}.0123abcd").mkdir()
    assert files.remove_stale(tmp_path) == [tmp_path / f".htsep-{ours}.0123abcd"]
    assert os.listdir(tmp_path) == [f".htsep-{theirs}.0123abcd"]
    # Names written before the namespace was part of the tag are still recognised.
    old = f"{head}{dead_pid}"
    (tmp_path / f".song.wav.{old}.0123abcd.tmp").write_bytes(b"x")
    assert files.remove_stale(tmp_path) == [tmp_path / f".song.wav.{old}.0123abcd.tmp"]


def _interrupt_after(owner, name: str, monkeypatch) -> None:
    """Make owner.name do its work, then raise KeyboardInterrupt: a Ctrl-C landing just after
    it, before the caller could take charge of what it made."""
    original = getattr(owner, name)

    def interrupted(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize(
    "where", ["a temporary is created", "a staging folder is created", "a track is staged"]
)
@pytest.mark.parametrize("pipeline", [True, False])
def test_an_interruption_right_after_a_file_is_made_leaves_nothing(
    repo, tmp_path, monkeypatch, where, pipeline
):
    """Wherever Ctrl-C lands, even between a file's creation and the code that would remove
    it, the command exits 130 and no hidden file or folder is left."""
    from htsep import audio, separator

    owner, name = {
        "a temporary is created": (audio, "create_temporary"),
        "a staging folder is created": (files.StagingFolder, "__init__"),
        "a track is staged": (separator.PendingOutputs, "stage"),
    }[where]
    _interrupt_after(owner, name, monkeypatch)
    clip = tmp_path / "in" / "song.wav"
    write_clip(clip, 2.0)
    out = tmp_path / "out"
    extra = [] if pipeline else ["--no-pipeline"]
    result = htsep("--repo", str(repo), *MODEL, *extra, "-o", str(out), str(clip))
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output
    # No hidden file or folder and no file (the track's empty folders may stay).
    assert not out.exists() or _hidden(out) == []
    assert not any(p.is_file() for p in out.rglob("*"))
