"""Training and fine-tuning on a MUSDB18-HQ-layout dataset, on one process or many (torchrun).

Dimensions: B batch, S sources, C audio channels, T samples.

Each training example is drawn from a random generator seeded with (seed, step, item), so the
data a step sees depends on nothing else: not on how many processes share the batch, not on
whether the run was interrupted. With the model, optimizer and EMA state saved in
``<run>/state.pt``, ``--resume`` continues exactly where the run stopped, and a 2-process run
computes the same steps as a 1-process run (up to float rounding of the gradient average).

Augmentations follow the HT Demucs recipe: a random excerpt per example, each source taken from
another random track with probability ``remix`` (remixing across tracks), shifted by up to
``shift_seconds`` independently of the others, its channels swapped and its sign flipped with
probability 1/2, and scaled by a gain drawn from [0.25, 1.25]. The mixture is the sum of the
augmented sources. The loss is the L1 distance between estimated and true sources.

Files in the run folder: ``run.json`` (the options), ``metrics.jsonl`` (one JSON object per
logged step ``{step, loss, lr}``, per validation ``{step, valid: {source: nSDR}, nsdr_mean}``
and at the end ``{step, event: "end", ...}``), ``model.safetensors`` (htsep's format, usable as
``htsep separate -n <run>/model.safetensors``; the EMA weights when EMA is on) and
``state.pt`` (what ``--resume`` needs).

A file the run cannot write (a full disk, a read-only folder, a file size limit) stops it with a
RunFolderError naming the folder and the reason; the temporary is removed, the last checkpoint
is kept, and a metrics record cut short is dropped when the run resumes. Temporaries a killed run
left behind are removed when the next run on the folder starts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel

from htsep import zoo
from htsep.audio import AudioReader
from htsep.checkpoint import load_model, save_model
from htsep.data import Track, find_tracks
from htsep.devices import parse_device
from htsep.errors import HtsepError, UsageError
from htsep.files import (
    FolderBusy,
    atomic_output,
    folder_lock,
    make_folder,
    real_path,
    remove_empty,
    remove_stale,
)
from htsep.model.config import (
    NAMED_CONFIGS,
    HTDemucsConfig,
    config_from_dict,
    config_to_dict,
    from_demucs_kwargs,
    show,
)
from htsep.model.htdemucs import HTDemucs

logger = logging.getLogger(__name__)

RUN_OPTIONS = "run.json"
METRICS = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
GAIN_RANGE = (0.25, 1.25)


class RunFolderError(HtsepError):
    """A file of the run cannot be written or read in its folder (a full disk, a read-only
    folder, a file size limit): the run stops, its last checkpoint intact."""


# The most steps a run may take (and the largest step intervals), and the largest batch: a run
# of 10**20 steps never ends, and a batch of 100,000 examples took memory until killed.
MAX_STEPS = 10**9
MAX_BATCH_SIZE = 1024


@dataclass(frozen=True)
class TrainOptions:
    """Everything that determines a run's numbers (saved as ``run.json``)."""

    dataset: str
    config: str | None = "tiny"  # a name in NAMED_CONFIGS or a YAML/JSON file; None with init
    init: str | None = None  # a checkpoint to fine-tune: registry name or file
    repo: str | None = None  # folder for ``init`` names, as in ``htsep separate --repo``
    steps: int = 1000
    batch_size: int = 4  # examples per step, over all processes
    lr: float = 3e-4
    ema: float = 0.0  # EMA decay of the weights (0: off); the exported model uses the average
    seed: int = 0
    shift_seconds: float = 0.5
    remix: float = 0.5  # probability of taking a source from another random track
    log_every: int = 10
    save_every: int = 100
    valid_every: int = 0  # steps between validations on the test split (0: only at the end)
    valid_tracks: int = 0  # test tracks used for validation (0: all)

    def check(self) -> None:
        """Raise UsageError for values no run can use."""
        for name in ("config", "init", "repo"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise UsageError(f"--{name}: empty value (an unset variable in a script?)")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "log_every": self.log_every}
        positive["save_every"] = self.save_every
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        # A run that could never end, or a batch no machine holds: refused before any work.
        highest = {"steps": MAX_STEPS, "batch_size": MAX_BATCH_SIZE, "log_every": MAX_STEPS,
                   "save_every": MAX_STEPS, "valid_every": MAX_STEPS,
                   "valid_tracks": MAX_STEPS}  # fmt: skip
        for name, most in highest.items():
            value = getattr(self, name)
            if value > most:
                raise UsageError(f"--{name.replace('_', '-')} must be at most {most}, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise UsageError(f"--ema must be in [0, 1), got {self.ema}")
        if not 0 <= self.remix <= 1:
            raise UsageError(f"remix probability must be in [0, 1], got {self.remix}")
        if self.shift_seconds < 0:
            raise UsageError(f"shift must be >= 0 seconds, got {self.shift_seconds}")
        if self.valid_every < 0 or self.valid_tracks < 0:
            raise UsageError("--valid-every and --valid-tracks must be >= 0")
        if self.init is not None and self.config is not None:
            raise UsageError("--config and --init exclude each other: fine-tuning keeps the "
                             "checkpoint's architecture")  # fmt: skip
        if self.init is None and self.config is None:
            raise UsageError("give --config (a size or a file) or --init (a checkpoint)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"--seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed <= 2**63 - 1:
            raise UsageError(f"--seed must be in 0..2^63-1, got {self.seed}")
        if not str(self.dataset).strip():
            raise UsageError("DATASET is an empty string (an unset variable in a script?)")


# --- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Processes:
        """From torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
        MASTER_PORT), read as ``--shard auto`` reads them (``batch.whole_variable``); one
        process when WORLD_SIZE is unset or 1. Values torchrun would never set (empty ones
        included) are a UsageError before any work: a rank outside the world waited forever
        for peers that never come."""
        from htsep.batch import whole_variable

        environ = os.environ
        world = whole_variable(environ, "WORLD_SIZE", "train")
        if world is None or world <= 1:
            return cls()
        rank = whole_variable(environ, "RANK", "train")
        if rank is None:
            raise UsageError("train: RANK is not set (torchrun sets it with WORLD_SIZE)")
        local_rank = whole_variable(environ, "LOCAL_RANK", "train") or 0
        if not rank < world:
            raise UsageError(f"train: RANK={rank} is not below WORLD_SIZE={world}")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if missing:
            raise UsageError(
                f"train: WORLD_SIZE={world} without {' and '.join(missing)}: start the "
                "processes with torchrun"
            )
        return cls(rank, world, local_rank)


@contextmanager
def process_group(processes: Processes, device: torch.device) -> Iterator[None]:
    """Join the torchrun job for the duration of a run (no-op for a single process)."""
    if processes.world == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        # Leave together: a gloo process whose peer already tore the group down can abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _training_device(name: str | None, processes: Processes) -> torch.device:
    device = parse_device(name)
    if device.type == "cuda" and processes.world > 1 and device.index is None:
        device = torch.device("cuda", processes.local_rank)
    return device


# --- the model ---------------------------------------------------------------------------------


def build_model(options: TrainOptions, sources: Sequence[str], sample_rate: int, channels: int
                ) -> HTDemucs:  # fmt: skip
    """A new network from ``options.config``, or the checkpoint ``options.init`` to fine-tune."""
    if options.init is not None:
        return _load_init(options.init, options.repo)
    assert options.config is not None
    if options.config in NAMED_CONFIGS:
        config = NAMED_CONFIGS[options.config](sources, sample_rate, channels)
    else:
        config = _config_file(Path(options.config), sources, sample_rate, channels)
    return HTDemucs(config)


def _config_file(
    path: Path, sources: Sequence[str], sample_rate: int, channels: int
) -> HTDemucsConfig:
    """A config file: htsep's own layout (``stft``/``conv``/``transformer`` groups), or the
    reference's constructor keywords (``channels``, ``nfft``, ``t_layers``, ...). The sources,
    sample rate and channel count are the dataset's unless the file says otherwise."""
    if not path.is_file():
        names = ", ".join(NAMED_CONFIGS)
        raise UsageError(f"--config {path}: neither a named size ({names}) nor a file")
    try:
        data = zoo.parse_yaml(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"--config {path}: unreadable ({reason})") from None
    if not isinstance(data, Mapping):
        raise UsageError(f"--config {path}: expected a mapping of options")
    data = {"sources": list(sources), "audio_channels": channels, **data}
    try:
        if {"stft", "conv", "transformer"} & set(data):
            data.setdefault("sample_rate", sample_rate)
            if "segment" in data and not isinstance(data["segment"], Mapping):
                text = str(data["segment"])
                # Not Fraction("1e999999999"): it would compute a billion-digit number.
                if isinstance(data["segment"], str) and not zoo.SEGMENT_TEXT.match(text):
                    raise ValueError(f"segment {show(text)}: expected seconds, e.g. 7.8")
                seconds = Fraction(text)
                data["segment"] = {"numerator": seconds.numerator,
                                   "denominator": seconds.denominator}  # fmt: skip
            return config_from_dict(data)
        data.setdefault("samplerate", sample_rate)
        return from_demucs_kwargs(data.pop("sources"), data)
    except HtsepError as exc:
        raise UsageError(f"--config {path}: {exc}") from None
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as exc:
        raise UsageError(f"--config {path}: invalid option ({exc})") from None


def _load_init(name: str, repo: str | None) -> HTDemucs:
    spec = zoo.find_model(name, repo=repo)
    if len(spec.members) != 1:
        raise UsageError(
            f"{name} is a bag of {len(spec.members)} networks: fine-tune one of them "
            f"(give its checkpoint file)"
        )
    return load_model(zoo.fetch(spec.members[0]))


# --- data --------------------------------------------------------------------------------------


class Excerpts:
    """Augmented training examples read from the dataset's stem files on demand.

    Each example depends only on (seed, step, item): see the module docstring.
    """

    def __init__(
        self,
        tracks: Sequence[Track],
        sources: Sequence[str],
        length: int,
        channels: int,
        shift: int,
        remix: float,
    ) -> None:
        self.tracks = list(tracks)
        self.sources = list(sources)
        self.length = length
        self.channels = channels
        self.shift = shift
        self.remix = remix
        self._readers: dict[Path, AudioReader] = {}

    def example(self, seed: int, step: int, item: int) -> torch.Tensor:
        """One augmented example: sources (S, C, length)."""
        rng = np.random.default_rng([seed, step, item])
        base = int(rng.integers(len(self.tracks)))
        out = torch.empty(len(self.sources), self.channels, self.length)
        for index, source in enumerate(self.sources):
            # Every draw happens in a fixed order, whatever the branch taken.
            other, take_other = int(rng.integers(len(self.tracks))), rng.random() < self.remix
            track = self.tracks[other if take_other else base]
            span = self.length + self.shift
            start = int(rng.integers(max(track.frames - span, 0) + 1))
            start += int(rng.integers(self.shift + 1))
            swap, flip = rng.random() < 0.5, rng.random() < 0.5
            gain = float(rng.uniform(*GAIN_RANGE))
            audio = self._read(track.stems[source], start)
            if swap and audio.shape[0] == 2:
                audio = audio.flip(0)
            out[index] = audio * (-gain if flip else gain)
        return out

    def batch(self, seed: int, step: int, items: range) -> torch.Tensor:
        """Examples ``items`` of step ``step``: (len(items), S, C, length)."""
        return torch.stack([self.example(seed, step, item) for item in items])

    def _read(self, path: Path, start: int) -> torch.Tensor:
        reader = self._readers.get(path)
        if reader is None:
            reader = self._readers[path] = AudioReader(path)
        audio = reader.read(start, self.length)  # (C', length), zeros past the end
        if audio.shape[0] == self.channels:
            return audio
        if audio.shape[0] == 1:
            return audio.expand(self.channels, -1)
        return audio.mean(0, keepdim=True).expand(self.channels, -1)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


# --- state -------------------------------------------------------------------------------------


class WeightAverage:
    """Exponential moving average of a model's floating-point state."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {
            key: value.detach().clone()
            for key, value in model.state_dict().items()
            if value.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for key, value in model.state_dict().items():
            if key in self.state:
                self.state[key].lerp_(value.detach(), 1 - self.decay)


class _RecordedWrites(io.BufferedWriter):
    """A file for ``torch.save`` that keeps the OSError of a failed write: torch reports any
    failed write as ``RuntimeError: unexpected pos``, without the reason (a full disk)."""

    error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as exc:
            self.error = exc
            raise


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically; a failed write is an OSError saying why."""
    with atomic_output(path) as temporary, _RecordedWrites(io.FileIO(temporary, "wb")) as file:
        try:
            torch.save(obj, file)
        except RuntimeError:
            if file.error is None:
                raise
            raise file.error from None


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` with one write of the whole line, so that a failure leaves
    at most a torn last line (which ``Trainer._trim_metrics`` drops), and not even that where
    the file can be cut back to its old end. Only the run holding the folder's lock writes."""
    data = memoryview(line.encode("utf-8"))
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(handle).st_size
        try:
            while data:  # more than one write only after a short one: the next says why
                data = data[os.write(handle, data) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(handle, end)
            raise
    finally:
        os.close(handle)


def _write_failure(exc: SafetensorError) -> str:
    """The reason in safetensors' message for a failed write ("... (os error 28)")."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return os.strerror(int(found.group(1))) if found else str(exc).splitlines()[0]


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor in the model's state, in order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- the run -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float  # the last logged loss
    seconds: float


class Trainer:
    """One training run in ``run_dir``; ``run`` trains up to ``options.steps``."""

    def __init__(
        self,
        options: TrainOptions,
        run_dir: Path,
        *,
        device: str | None = None,
        resume: bool = False,
        progress: bool = True,
        on_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        options.check()
        self.options = options
        self.run_dir = run_dir
        self.processes = Processes.from_environment()
        self.device = _training_device(device, self.processes)
        self.resume = resume
        self.progress = progress
        self.on_log = on_log

    # --- set-up ------------------------------------------------------------------------------

    def _prepare_folder(self) -> None:
        if self.options.batch_size % self.processes.world:
            raise UsageError(
                f"--batch-size {self.options.batch_size} does not split over "
                f"{self.processes.world} processes"
            )
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"--out {self.run_dir}: not a folder")
        state = self.run_dir / STATE_FILE
        if self.resume:
            if not state.is_file():
                raise UsageError(f"{self.run_dir}: nothing to resume (no {STATE_FILE})")
        elif state.exists():
            raise UsageError(
                f"{self.run_dir} already holds a training run: continue it with --resume, "
                f"or choose another --out"
            )
        else:
            # Files a run would replace are the user's unless a run that failed before its
            # first save left them: its run.json (htsep's, readable as a run's options) and
            # its metrics. A run writes its model only after a state.pt, so a model file
            # without one is never a run's.
            ours = _run_options_file(self.run_dir / RUN_OPTIONS)
            candidates = (MODEL_FILE,) if ours else (RUN_OPTIONS, METRICS, MODEL_FILE)
            theirs = [name for name in candidates if os.path.lexists(self.run_dir / name)]
            if theirs:
                raise UsageError(
                    f"{self.run_dir} holds {' and '.join(theirs)}, which a run would replace: "
                    "choose another --out"
                )

    def _dataset(self, model_sources: Sequence[str] | None) -> tuple[list[str], list[Track]]:
        root = Path(self.options.dataset)
        return find_tracks(root, "train", model_sources)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self._prepare_folder()
        cuda = [self.device] if self.device.type == "cuda" else []
        # torch's global generator drives weight initialization and dropout: seed it for this
        # run only, and give the caller's state back afterwards.
        with (
            self._owned_folder(),
            process_group(self.processes, self.device),
            torch.random.fork_rng(devices=cuda),
        ):
            torch.manual_seed(self.options.seed)
            return self._run()

    @contextmanager
    def _owned_folder(self) -> Iterator[None]:
        """The run folder, locked by the main process for the whole run: a second run on it
        (another htsep train, resumed or not) is a UsageError, where both ran before and
        interleaved their checkpoints and metrics. The folders made here (the run's and its
        parents) that a failure left empty are removed."""
        if not self.processes.main:
            yield
            return
        try:
            made = make_folder(self.run_dir)
        except OSError as exc:
            raise UsageError(
                f"--out {self.run_dir}: cannot make the folder: {exc.strerror or exc}"
            ) from None
        try:
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(folder_lock(self.run_dir))
                except FolderBusy:
                    raise UsageError(
                        f"--out {self.run_dir}: another htsep train is running in this folder"
                    ) from None
                except OSError as exc:
                    raise UsageError(f"--out {self.run_dir}: {exc.strerror or exc}") from None
                # Checked again now that no other run can change the folder: one that finished
                # meanwhile left a state.pt that this run must not replace.
                self._prepare_folder()
                # The lock is ours, so no run writes here: a temporary whose owner is gone was
                # left by a killed run (a state.pt's, hundreds of MB, after kill -9 between
                # torch.save and the rename) and would stay forever.
                remove_stale(self.run_dir)
                yield
        except BaseException:
            remove_empty(made)  # the folders made here (parents too) that the failure left empty
            raise

    def _run(self) -> TrainResult:
        options, processes = self.options, self.processes
        started = time.perf_counter()
        model_sources = None
        if options.init is not None:
            model = build_model(options, (), 0, 0)
            model_sources = model.sources
            sources, tracks = self._dataset(model_sources)
        else:
            sources, tracks = self._dataset(None)
            rate, channels = tracks[0].sample_rate, max(track.channels for track in tracks)
            model = build_model(options, sources, rate, channels)
        if tracks[0].sample_rate != model.sample_rate:
            raise UsageError(
                f"the dataset is at {tracks[0].sample_rate} Hz and the model at "
                f"{model.sample_rate} Hz: resample the dataset"
            )
        model.to(self.device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
        average = WeightAverage(model, options.ema) if options.ema else None
        step = 0
        if self.resume:
            step = self._load_state(model, optimizer, average)
        elif processes.main:
            # A run that saved no step before it failed is started over, not continued.
            with self._writing(METRICS):
                (self.run_dir / METRICS).unlink(missing_ok=True)
            with self._writing(RUN_OPTIONS):
                _atomic_write_text(
                    self.run_dir / RUN_OPTIONS, json.dumps(dataclasses.asdict(options), indent=2)
                )
        if processes.main:
            self._trim_metrics(step)
        trained: torch.nn.Module = model
        if processes.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            trained = DistributedDataParallel(model, device_ids=device_ids)

        excerpts = Excerpts(
            tracks,
            sources,
            model.segment_length,
            model.audio_channels,
            shift=round(options.shift_seconds * model.sample_rate),
            remix=options.remix,
        )
        share = options.batch_size // processes.world
        mine = range(processes.rank * share, (processes.rank + 1) * share)
        source_index = [sources.index(name) for name in model.sources]
        bar = _progress_bar(options.steps, step, self.progress and processes.main)
        losses: list[float] = []
        last_loss = math.nan
        try:
            while step < options.steps:
                # All randomness of a step comes from (seed, step): data and dropout alike.
                torch.manual_seed(options.seed * 1_000_003 + step)
                batch = excerpts.batch(options.seed, step, mine).to(self.device)
                targets = batch[:, source_index]  # (B, S, C, T) in the model's source order
                estimate = trained(batch.sum(1))
                loss = F.l1_loss(estimate, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if average is not None:
                    average.update(model)
                step += 1
                losses.append(_global_mean(loss.detach(), processes))
                if not math.isfinite(losses[-1]):
                    # Its weights are spoiled: not logged (NaN is not JSON) and not saved.
                    raise HtsepError(
                        f"training diverged at step {step} (loss {losses[-1]}): the last "
                        "checkpoint is intact; start a new run with a lower --lr"
                    )
                bar.update(1)
                if step % options.log_every == 0 or step == options.steps:
                    last_loss = sum(losses) / len(losses)
                    losses.clear()
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    self._log({"step": step, "loss": last_loss, "lr": options.lr})
                if step % options.save_every == 0 or step == options.steps:
                    self._save(model, optimizer, average, step)
                validate = options.valid_every and step % options.valid_every == 0
                if validate or step == options.steps:
                    self._validate(step)
        finally:
            bar.close()
            excerpts.close()
        seconds = time.perf_counter() - started
        digests = _gather(weights_digest(model), processes)
        self._log({"step": step, "event": "end", "seconds": round(seconds, 3),
                   "rank_digests": digests})  # fmt: skip
        return TrainResult(self.run_dir, step, last_loss, seconds)

    # --- saving and logging ------------------------------------------------------------------

    @contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Turn a failed write of the run's file ``name`` into one RunFolderError naming the
        folder and the reason, where it was a traceback of torch's or safetensors' internals.
        The writers remove their temporaries themselves."""
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise RunFolderError(f"{self.run_dir}: cannot write {name}: {reason}") from None
        except SafetensorError as exc:
            reason = _write_failure(exc)
            raise RunFolderError(f"{self.run_dir}: cannot write {name}: {reason}") from None

    def _log(self, record: dict[str, Any]) -> None:
        if not self.processes.main:
            return
        with self._writing(METRICS):
            _append_line(self.run_dir / METRICS, json.dumps(record) + "\n")
        if self.on_log is not None:
            self.on_log(record)

    def _trim_metrics(self, step: int) -> None:
        """Drop records past the step a resumed run restarts from (written after its last save),
        so the log reads as one uninterrupted run. A last line without its newline was cut short
        by a failed write (a full disk, a killed run) and is dropped too: it came after the last
        save, which follows its step's record. Any other line that is not JSON is refused."""
        path = self.run_dir / METRICS
        if not path.exists():
            return
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as exc:
            raise RunFolderError(f"{path}: cannot read it: {exc.strerror or exc}") from None
        lines.pop()  # empty after a whole last line, else a torn one
        try:
            records = [json.loads(line.decode("utf-8")) for line in lines if line]
        except (UnicodeError, ValueError):
            raise UsageError(f"{path}: not a metrics log of htsep (a line is not JSON)") from None
        if not all(isinstance(record, dict) for record in records):
            raise UsageError(f"{path}: not a metrics log of htsep (a line is not an object)")
        if any(type(record.get("step", 0)) is not int for record in records):
            raise UsageError(f"{path}: not a metrics log of htsep (a step is not a whole number)")
        kept = [r for r in records if r.get("step", 0) <= step and r.get("event") != "end"]
        with self._writing(METRICS):
            _atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))

    def _exported(self, model: HTDemucs, average: WeightAverage | None) -> HTDemucs:
        if average is None:
            return model
        copy_ = copy.deepcopy(model)
        copy_.load_state_dict({**model.state_dict(), **average.state})
        return copy_

    def _save(
        self,
        model: HTDemucs,
        optimizer: torch.optim.Optimizer,
        average: WeightAverage | None,
        step: int,
    ) -> None:
        if not self.processes.main:
            return
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": None if average is None else average.state,
            "config": json.dumps(config_to_dict(model.config)),
        }
        with self._writing(STATE_FILE):
            _atomic_torch_save(state, self.run_dir / STATE_FILE)
        metadata = {"training_step": str(step), "training_run": str(real_path(self.run_dir))}
        with self._writing(MODEL_FILE):  # save_model's own OSErrors are CheckpointErrors
            save_model(self._exported(model, average), self.run_dir / MODEL_FILE, metadata)

    def _load_state(
        self, model: HTDemucs, optimizer: torch.optim.Optimizer, average: WeightAverage | None
    ) -> int:
        path = self.run_dir / STATE_FILE
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which, not a traceback
            raise UsageError(
                f"{path}: cannot resume from it ({str(exc).splitlines()[0]})"
            ) from None
        problem = f"{path}: cannot resume from it (not a training state of htsep"
        try:
            config = json.loads(state["config"])
            step = state["step"]
        except (TypeError, KeyError, IndexError, ValueError):
            raise UsageError(f"{problem})") from None
        if config != config_to_dict(model.config):
            raise UsageError(f"{path}: saved by a run with another model configuration")
        if type(step) is not int or step < 0:
            raise UsageError(f"{problem}: its step is {show(step)})")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if average is not None:
                if state["ema"] is None:
                    raise UsageError(f"{path}: the run had no EMA; resume it without --ema")
                ema = {key: value.to(self.device) for key, value in state["ema"].items()}
                if ema.keys() != average.state.keys() or any(
                    value.shape != average.state[key].shape for key, value in ema.items()
                ):
                    raise ValueError("its averaged weights do not fit the model")
                average.state = ema
        except (TypeError, KeyError, IndexError, ValueError, RuntimeError, AttributeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"{problem}: {show(reason)})") from None
        return step

    def _validate(self, step: int) -> None:
        if self.processes.main:
            record = validate_run(self.run_dir, self.options, self.device)
            if record is not None:
                self._log({"step": step, **record})
        if self.processes.world > 1:
            dist.barrier()


def validate_run(run_dir: Path, options: TrainOptions, device: torch.device
                 ) -> dict[str, Any] | None:  # fmt: skip
    """nSDR per source of the run's exported model on the dataset's test split (None if the
    dataset has no test split)."""
    from htsep.evaluate import evaluate
    from htsep.separator import Separator

    root = Path(options.dataset)
    if not (root / "test").is_dir():
        return None
    separator = Separator(str(run_dir / MODEL_FILE), device=str(device), shifts=0, progress=False)
    sources, tracks = find_tracks(root, "test", separator.sources)
    if options.valid_tracks:
        tracks = tracks[: options.valid_tracks]
    report = evaluate(separator, tracks, sources)
    means = {source: round(value, 4) for source, value in report.mean.items()}
    return {"valid": means, "nsdr_mean": round(sum(means.values()) / len(means), 4)}


def _global_mean(value: torch.Tensor, processes: Processes) -> float:
    if processes.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= processes.world
    return float(value)


def _gather(value: str, processes: Processes) -> list[str]:
    if processes.world == 1:
        return [value]
    values: list[Any] = [None] * processes.world
    dist.all_gather_object(values, value)
    return [str(item) for item in values]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="training")


def run_options(
    run_dir: Path, values: Mapping[str, Any], given: Collection[str], *, resume: bool
) -> TrainOptions:
    """The options of ``htsep train``. ``values``: TrainOptions fields as the command line
    has them (None where not given); ``given``: the names the user typed.

    A new run takes ``values``, with the defaults (``config`` tiny unless ``init`` is given,
    1000 steps). ``resume`` continues the run in ``run_dir`` with its saved options, of which
    only the dataset (it may have moved) and ``steps`` may change: any other field in
    ``given`` is a UsageError.
    """
    if not resume:
        chosen = {key: value for key, value in values.items() if value is not None}
        if "init" in chosen:
            chosen.setdefault("config", None)
        return TrainOptions(**chosen)
    saved = load_run_options(run_dir)  # first: is there a run to resume at all?
    fields = {field.name for field in dataclasses.fields(TrainOptions)}
    fixed = sorted((set(given) & fields) - {"dataset", "steps"})
    if fixed:
        names = ", ".join("--" + name.replace("_", "-") for name in fixed)
        raise UsageError(
            f"--resume continues with the run's saved options; {names} cannot change "
            f"(see {run_dir / RUN_OPTIONS})"
        )
    options = dataclasses.replace(saved, dataset=values["dataset"])
    steps = values.get("steps")
    return options if steps is None else dataclasses.replace(options, steps=steps)


def _run_options_file(path: Path) -> bool:
    """Whether ``path`` is a run.json that htsep wrote: a regular file of a run's options."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 1 << 20:
            return False
        data = json.loads(path.read_text("utf-8"))
        TrainOptions(**data)
    except (OSError, ValueError, TypeError, HtsepError):
        return False
    return True


def load_run_options(run_dir: Path) -> TrainOptions:
    """The options a run in ``run_dir`` was started with (for ``--resume``)."""
    path = run_dir / RUN_OPTIONS
    if not (run_dir / STATE_FILE).is_file() or not path.is_file():
        raise UsageError(f"{run_dir}: nothing to resume (no {STATE_FILE} or {RUN_OPTIONS})")
    try:
        data = json.loads(path.read_text("utf-8"))
        return TrainOptions(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"{path}: unreadable run options ({exc})") from None
