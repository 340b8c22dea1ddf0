"""--shard auto: each process of a SLURM job array, a torchrun or an srun launch takes its own
slice of the inputs (and under torchrun or srun its local rank's GPU), read from the
environment; together the processes cover every input exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import htsep, write_clip

from htsep.batch import Shard, Track, shard_device, shard_from_environment, take_shard
from htsep.errors import UsageError

LAUNCH_VARIABLES = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_ARRAY_TASK_COUNT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
]
NOTHING_FOUND = (
    "found no SLURM array task (SLURM_ARRAY_TASK_ID), torchrun rank (RANK, "
    "WORLD_SIZE) or srun task (SLURM_PROCID, SLURM_STEP_NUM_TASKS) in the environment; "
    "give --shard K/N"
)


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    """The tests set the launch they simulate; the one running them (SLURM, torchrun) is hidden."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _array(task: int, first: int, last: int, step: int = 1, count: int | None = None) -> dict:
    """What SLURM sets in a task of --array=first-last:step (count: its number of tasks)."""
    count = (last - first) // step + 1 if count is None else count
    return {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(first),
        "SLURM_ARRAY_TASK_MAX": str(last),
        "SLURM_ARRAY_TASK_STEP": str(step),
        "SLURM_ARRAY_TASK_COUNT": str(count),
    }


def _torchrun(rank: int, world: int, local_rank: int | None = None) -> dict:
    local = rank if local_rank is None else local_rank
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}


def _srun(rank: int, tasks: int, local_rank: int | None = None) -> dict:
    local = rank if local_rank is None else local_rank
    return {
        "SLURM_PROCID": str(rank),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_LOCALID": str(local),
    }


# --- where the shard comes from -----------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (_array(0, 0, 7), Shard(1, 8, "SLURM array task 0 in 0-7")),
        (_array(3, 0, 7), Shard(4, 8, "SLURM array task 3 in 0-7")),
        (_array(8, 1, 8), Shard(8, 8, "SLURM array task 8 in 1-8")),
        # --array=0-15:2 runs ids 0, 2, ..., 14: eight tasks.
        (_array(6, 0, 14, step=2), Shard(4, 8, "SLURM array task 6 in 0-14:2")),
        (_array(14, 0, 14, step=2), Shard(8, 8, "SLURM array task 14 in 0-14:2")),
        (_array(5, 5, 5), Shard(1, 1, "SLURM array task 5 in 5-5")),
        # Without STEP (older SLURM): a step of 1; without COUNT: from MIN and MAX.
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"},
         Shard(2, 4, "SLURM array task 2 in 1-4")),
        # COUNT alone: the ids are 0 .. COUNT - 1.
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"},
         Shard(4, 8, "SLURM array task 3 in 0-7")),
        (_torchrun(0, 1), Shard(1, 1, "torchrun rank 0 of 1")),
        (_torchrun(2, 8), Shard(3, 8, "torchrun rank 2 of 8")),
        (_torchrun(7, 8, local_rank=3), Shard(8, 8, "torchrun rank 7 of 8")),
        (_srun(3, 4), Shard(4, 4, "srun task 3 of 4")),
        # Array and ranks: array task x world + rank, rank fastest.
        ({**_array(1, 0, 3), **_torchrun(1, 2)},
         Shard(4, 8, "SLURM array task 1 in 0-3, torchrun rank 1 of 2")),
        ({**_array(3, 1, 3), **_srun(0, 4)},
         Shard(9, 12, "SLURM array task 3 in 1-3, srun task 0 of 4")),
        # torchrun started by srun (one torchrun per node): torchrun numbers every process.
        ({**_srun(1, 2), **_torchrun(5, 16, local_rank=5)}, Shard(6, 16, "torchrun rank 5 of 16")),
        # A batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step: no ranks.
        ({**_array(2, 0, 3), "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"},
         Shard(3, 4, "SLURM array task 2 in 0-3")),
        # Leading zeros are still whole numbers.
        ({"RANK": "01", "WORLD_SIZE": "02"}, Shard(2, 2, "torchrun rank 1 of 2")),
    ],
)  # fmt: skip
def test_the_shard_of_each_launch(environ, expected):
    assert shard_from_environment(environ) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, NOTHING_FOUND),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "12"}, NOTHING_FOUND),
        ({"SLURM_ARRAY_TASK_ID": ""},
         "SLURM_ARRAY_TASK_ID is empty (an unset variable in a script?)"),
        ({**_array(1, 0, 3), "SLURM_ARRAY_TASK_COUNT": " "},
         "SLURM_ARRAY_TASK_COUNT is empty (an unset variable in a script?)"),
        ({"RANK": "two", "WORLD_SIZE": "4"}, "RANK='two': expected a whole number"),
        ({"RANK": "-1", "WORLD_SIZE": "4"}, "RANK='-1': expected a whole number"),
        ({"RANK": "1 ", "WORLD_SIZE": "4"}, "RANK='1 ': expected a whole number"),
        ({"RANK": "1.0", "WORLD_SIZE": "4"}, "RANK='1.0': expected a whole number"),
        ({"RANK": "\u0663", "WORLD_SIZE": "4"}, "RANK='\u0663': expected a whole number"),
        ({"RANK": "1", "WORLD_SIZE": "9" * 5000}, f"WORLD_SIZE={'9' * 5000}: too large"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is not a rank of WORLD_SIZE=4"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 is not a rank of WORLD_SIZE=0"),
        ({"RANK": "1"}, "RANK is set without WORLD_SIZE"),
        ({"WORLD_SIZE": "4"}, "WORLD_SIZE is set without RANK"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "4"}, "LOCAL_RANK=4 with WORLD_SIZE=4"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": ""},
         "LOCAL_RANK is empty (an unset variable in a script?)"),
        ({"SLURM_STEP_NUM_TASKS": "4"}, "SLURM_STEP_NUM_TASKS is set without SLURM_PROCID"),
        (_srun(4, 4), "SLURM_PROCID=4 is not a rank of SLURM_STEP_NUM_TASKS=4"),
        ({"SLURM_ARRAY_TASK_ID": "3"},
         "SLURM_ARRAY_TASK_ID=3 without SLURM_ARRAY_TASK_MIN and _MAX or SLURM_ARRAY_TASK_COUNT: "
         "the array's size is unknown"),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0"},
         "SLURM_ARRAY_TASK_MIN is set without SLURM_ARRAY_TASK_MAX"),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MAX": "7"},
         "SLURM_ARRAY_TASK_MAX is set without SLURM_ARRAY_TASK_MIN"),
        ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8"},
         "SLURM_ARRAY_TASK_ID=8 is outside the array 0-7"),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"},
         "SLURM_ARRAY_TASK_COUNT=0 with SLURM_ARRAY_TASK_ID=0"),
        (_array(9, 1, 8), "SLURM_ARRAY_TASK_ID=9 is outside the array 1-8"),
        (_array(0, 1, 8), "SLURM_ARRAY_TASK_ID=0 is outside the array 1-8"),
        (_array(3, 0, 14, step=2), "step 2 does not divide task 3 (array 0-14:2)"),
        (_array(2, 0, 15, step=2, count=8),
         "step 2 does not divide the array's span (array 0-15:2)"),
        (_array(0, 0, 7, step=0, count=8), "SLURM_ARRAY_TASK_STEP=0: the step is at least 1"),
        # --array=1,3,7: SLURM says 3 tasks between 1 and 7; their places cannot be known.
        (_array(3, 1, 7, count=3),
         "SLURM array of 3 tasks with ids from 1 to 7 that are not evenly spaced (a list such "
         "as --array=1,3,7): this task cannot tell its place; submit a range (--array=0-2) or "
         "give --shard K/N"),
        (_array(0, 0, 15, step=1, count=10),
         "SLURM array of 10 tasks with ids from 0 to 15 that are not evenly spaced (a list such "
         "as --array=1,3,7): this task cannot tell its place; submit a range (--array=0-9) or "
         "give --shard K/N"),
        # A bad array is refused even with good ranks, and bad ranks with a good array.
        ({**_array(7, 1, 7, count=3), **_torchrun(0, 2)},
         "SLURM array of 3 tasks with ids from 1 to 7 that are not evenly spaced (a list such "
         "as --array=1,3,7): this task cannot tell its place; submit a range (--array=0-2) or "
         "give --shard K/N"),
        ({**_array(1, 0, 3), "RANK": "2", "WORLD_SIZE": "2"},
         "RANK=2 is not a rank of WORLD_SIZE=2"),
    ],
)  # fmt: skip
def test_what_cannot_be_a_shard_is_one_line(environ, message):
    with pytest.raises(UsageError) as caught:
        shard_from_environment(environ)
    assert str(caught.value) == f"--shard auto: {message}"


def test_a_list_array_refuses_every_task():
    """--array=1,3,7 as SLURM describes it to each of its tasks: none runs a guessed slice."""
    for task in (1, 3, 7):
        with pytest.raises(UsageError, match="not evenly spaced"):
            shard_from_environment(_array(task, 1, 7, count=3))


def _covering(environments: list[dict], inputs: int) -> list[str]:
    tracks = [Track(f"t{index}", None) for index in range(inputs)]
    taken: list[str] = []
    for environ in environments:
        shard = shard_from_environment(environ)
        taken += [track.source for track in take_shard(tracks, shard.index, shard.count)]
    return taken


@pytest.mark.parametrize(
    ("layout", "environments"),
    [
        ("array 0-7", [_array(t, 0, 7) for t in range(8)]),
        ("array 1-5", [_array(t, 1, 5) for t in range(1, 6)]),
        ("array 0-14:2", [_array(t, 0, 14, 2) for t in range(0, 15, 2)]),
        ("array 3-21:6", [_array(t, 3, 21, 6) for t in range(3, 22, 6)]),
        ("array of COUNT 4", [{"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "4"}
                              for t in range(4)]),
        ("torchrun 8", [_torchrun(r, 8) for r in range(8)]),
        ("srun 3", [_srun(r, 3) for r in range(3)]),
        ("array 0-3 x torchrun 2", [{**_array(t, 0, 3), **_torchrun(r, 2)}
                                    for t in range(4) for r in range(2)]),
        ("array 1-3 x torchrun 4 on 2 nodes",
         [{**_array(t, 1, 3), **_torchrun(r, 4, local_rank=r % 2)}
          for t in range(1, 4) for r in range(4)]),
        ("array 0-10:5 x srun 2", [{**_array(t, 0, 10, 5), **_srun(r, 2)}
                                   for t in (0, 5, 10) for r in range(2)]),
        ("array 0-6 x srun 5 (more slices than inputs)",
         [{**_array(t, 0, 6), **_srun(r, 5)} for t in range(7) for r in range(5)]),
    ],
)  # fmt: skip
def test_the_processes_of_a_job_cover_every_input_once(layout, environments):
    for inputs in (1, 7, 23, 64):
        taken = _covering(environments, inputs)
        assert sorted(taken) == sorted(f"t{index}" for index in range(inputs)), (layout, inputs)
    counts = {shard_from_environment(environ).count for environ in environments}
    assert counts == {len(environments)}, layout  # every process agrees on N


# --- the device of each process -----------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices (0: no CUDA)."""

    def pretend(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return pretend


@pytest.mark.parametrize(
    ("visible", "device", "environ", "expected"),
    [
        (8, None, _torchrun(2, 8), "cuda:2"),
        (8, "cuda", _torchrun(2, 8), "cuda:2"),
        (8, None, _torchrun(13, 16, local_rank=5), "cuda:5"),
        (8, "cuda:3", _torchrun(2, 8), "cuda:3"),  # explicit choices win
        (8, "cpu", _torchrun(2, 8), "cpu"),
        (8, "mps", _torchrun(2, 8), "mps"),
        (0, None, _torchrun(2, 8), None),  # no CUDA: the default device, silently
        (0, "cuda", _torchrun(2, 8), "cuda"),  # left for parse_device to refuse
        (4, None, _srun(3, 4), "cuda:3"),
        (1, None, _srun(3, 8), "cuda:0"),  # srun --gpus-per-task=1: each task sees its own
        (8, None, _array(3, 0, 7), None),  # an array task alone keeps the default device
        (8, None, {"RANK": "1", "WORLD_SIZE": "2"}, None),  # no LOCAL_RANK: no choice
        (8, None, {**_array(1, 0, 3), **_torchrun(1, 2)}, "cuda:1"),
        (2, None, {}, None),
    ],
)
def test_each_process_takes_its_local_rank_gpu(gpus, visible, device, environ, expected):
    gpus(visible)
    assert shard_device(device, environ) == expected


@pytest.mark.parametrize(
    ("visible", "environ", "message"),
    [
        (2, _torchrun(2, 4), "LOCAL_RANK=2 has no GPU of its own (2 CUDA devices visible); "
                             "start at most 2 processes per machine, or give --device"),
        # torchrun's processes all see the same GPUs: one GPU for two processes is refused.
        (1, _torchrun(1, 2), "LOCAL_RANK=1 has no GPU of its own (1 CUDA device visible); "
                             "start at most 1 processes per machine, or give --device"),
        (2, _srun(3, 4), "SLURM_LOCALID=3 has no GPU of its own (2 CUDA devices visible); "
                         "start at most 2 processes per machine, or give --device"),
    ],
)  # fmt: skip
def test_a_local_rank_without_a_gpu_is_one_line(gpus, visible, environ, message):
    gpus(visible)
    with pytest.raises(UsageError) as caught:
        shard_device(None, environ)
    assert str(caught.value) == f"--shard auto: {message}"
    assert shard_device("cuda:0", environ) == "cuda:0"  # unless the user chose


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def album(tmp_path):
    for index in range(3):
        write_clip(tmp_path / "album" / f"t{index}.wav", 0.3, seed=index)
    return tmp_path / "album"


def _separate(repo, out, *args):
    return htsep("--repo", str(repo), "-n", "aaaa0001", "--stems", "vocals", "-o", str(out), *args)


def _written(out) -> list[str]:
    return sorted(p.parent.name for p in Path(out).rglob("vocals.wav"))


def test_auto_without_a_launcher_is_a_usage_error(tmp_path, repo, album):
    result = _separate(repo, tmp_path / "out", "--shard", "auto", str(album))
    assert result.exit_code == 2, result.output
    assert result.stderr == f"htsep: error: --shard auto: {NOTHING_FOUND}\n"
    assert not (tmp_path / "out").exists()


def test_auto_with_a_bad_variable_is_a_usage_error(tmp_path, repo, album, monkeypatch):
    monkeypatch.setenv("RANK", "")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = _separate(repo, tmp_path / "out", "--shard", "auto", str(album))
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "htsep: error: --shard auto: RANK is empty (an unset variable in a script?)\n"
    )
    assert not (tmp_path / "out").exists()


def test_auto_refuses_a_local_rank_without_a_gpu_before_any_work(
    tmp_path, repo, album, monkeypatch, gpus
):
    gpus(1)
    for name, value in _torchrun(1, 2).items():
        monkeypatch.setenv(name, value)
    result = _separate(repo, tmp_path / "out", "--shard", "auto", str(album))
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "htsep: error: --shard auto: LOCAL_RANK=1 has no GPU of its own (1 CUDA device "
        "visible); start at most 1 processes per machine, or give --device\n"
    )
    assert not (tmp_path / "out").exists()


def test_auto_under_torchrun_takes_the_rank_and_says_so(tmp_path, repo, album, monkeypatch, gpus):
    gpus(0)  # the default device, whatever this machine has
    out = tmp_path / "out"
    lines = []
    for rank in range(2):
        for name, value in _torchrun(rank, 2).items():
            monkeypatch.setenv(name, value)
        result = _separate(repo, out, "--shard", "auto", str(album))
        assert result.exit_code == 0, result.output
        lines.append(result.stderr.splitlines()[0])
        assert "(1 network) on cpu;" in result.stderr
    assert lines == [
        "htsep: shard 1/2 (torchrun rank 0 of 2): 2 of 3 inputs",
        "htsep: shard 2/2 (torchrun rank 1 of 2): 1 of 3 inputs",
    ]
    assert _written(out) == ["t0", "t1", "t2"]


def test_auto_in_a_slurm_array_covers_the_inputs_once(tmp_path, repo, album, monkeypatch):
    out = tmp_path / "out"
    seen: list[str] = []
    for task in (1, 2):  # --array=1-2
        for name, value in _array(task, 1, 2).items():
            monkeypatch.setenv(name, value)
        result = _separate(repo, out, "--shard", "auto", "--json", str(album))
        assert result.exit_code == 0, result.output
        seen += [Path(json.loads(line)["input"]).stem for line in result.stdout.splitlines()]
        taken = "2 of 3 inputs" if task == 1 else "1 of 3 inputs"
        assert result.stderr.splitlines()[0] == (
            f"htsep: shard {task}/2 (SLURM array task {task} in 1-2): {taken}"
        )
    assert sorted(seen) == ["t0", "t1", "t2"]
    assert _written(out) == ["t0", "t1", "t2"]
    # --array=0-4 over 3 inputs: the last tasks have nothing to do, and succeed.
    for name, value in _array(4, 0, 4).items():
        monkeypatch.setenv(name, value)
    result = _separate(repo, tmp_path / "empty", "--shard", "auto", str(album))
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "htsep: shard 5/5 (SLURM array task 4 in 0-4) is empty (3 inputs); nothing to do\n"
    )
    assert not (tmp_path / "empty").exists()


def test_quiet_hides_the_shard_line_and_k_of_n_is_unchanged(tmp_path, repo, album, monkeypatch):
    for name, value in _srun(0, 3).items():
        monkeypatch.setenv(name, value)
    quiet = _separate(repo, tmp_path / "a", "--shard", "auto", "-q", str(album))
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output
    assert _written(tmp_path / "a") == ["t0"]
    given = _separate(repo, tmp_path / "b", "--shard", "3/3", str(album))
    assert given.exit_code == 0, given.output
    assert not given.stderr.startswith("htsep: shard")  # K/N as before: no line about it
    assert _written(tmp_path / "b") == ["t2"]


def test_torchrun_runs_two_processes_over_a_folder(tmp_path):
    """The real launcher: `torchrun --nproc-per-node 2 -m htsep separate --shard auto DIR`;
    every clip's stems are written by exactly one process, and both exit 0."""
    for index in range(3):
        write_clip(tmp_path / "album" / f"t{index}.wav", 1.0, rate=44100, seed=index)
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environ["CUDA_VISIBLE_DEVICES"] = ""  # the same run on any machine: both on the CPU
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "htsep", "separate", "-n", "htsep-tiny", "--shard", "auto", "--json"]
        + [str(tmp_path / "album"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
    )
    assert done.returncode == 0, done.stderr  # torchrun: 0 only when every process exits 0
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(Path(r["input"]).name for r in records) == ["t0.wav", "t1.wav", "t2.wav"]
    assert all(r["status"] == "ok" and len(r["outputs"]) == 4 for r in records)
    out = tmp_path / "out"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [
        f"htsep-tiny/t{index}/{stem}.wav"
        for index in range(3)
        for stem in ["bass", "drums", "other", "vocals"]
    ]
    for rank, taken in [(0, "2 of 3"), (1, "1 of 3")]:
        assert f"htsep: shard {rank + 1}/2 (torchrun rank {rank} of 2): {taken} inputs" in (
            done.stderr
        )
