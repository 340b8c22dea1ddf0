"""The command line: a thin Typer layer that parses, calls the library and reports.

Exit codes: 0 every track succeeded (or was skipped), 1 some track or the model failed,
2 usage errors (bad options, unknown model). Errors are one line on stderr, no traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import functools
import inspect
import json
import logging
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperArgument, TyperCommand, TyperGroup

from htsep import __version__
from htsep.batch import (
    Batch,
    BatchEvents,
    ClipMode,
    OtherMethod,
    OutputSettings,
    Shard,
    Track,
    check_template,
    check_track_clashes,
    find_inputs,
    output_folder,
    parse_shard,
    shard_device,
    shard_from_environment,
    take_shard,
)
from htsep.errors import DownloadError, HtsepError, ModelNotFoundError, UsageError
from htsep.interrupts import (
    Terminated,
    exit_status,
    hold_signals_while_torch_loads,
    how_stopped,
    signals_as_interrupts,
    signals_held,
)

if TYPE_CHECKING:
    from typer._click import Context as ClickContext
    from typer._click import HelpFormatter

    from htsep.data import Track as DatasetTrack


class _OneLineUsageError(ClickUsageError):
    """click's usage errors (an unknown option, a bad choice, a missing input) as the one line
    every other error is, with exit code 2, instead of click's usage block."""

    def show(self, file: Any = None) -> None:
        _error(self.format_message())


def _one_line_usage_errors(parse: Any, ctx: ClickContext, args: list[str]) -> list[str]:
    try:
        return list(parse(ctx, args))
    except _OneLineUsageError:
        raise
    except ClickUsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `htsep` alone: the help, as it is
            raise
        raise _OneLineUsageError(exc.format_message(), exc.ctx) from None


class _Group(TyperGroup):
    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        return _one_line_usage_errors(super().parse_args, ctx, args)

    def resolve_command(self, ctx: ClickContext, args: list[str]) -> Any:
        return _one_line_usage_errors(super().resolve_command, ctx, args)

    def invoke(self, ctx: ClickContext) -> Any:
        # `htsep -v` alone: click's "Missing command." comes from here, in three lines.
        try:
            return super().invoke(ctx)
        except _OneLineUsageError:
            raise
        except ClickUsageError as exc:
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from None


_PLAIN_NUMBER = {
    int: re.compile(r"[+-]?[0-9]+"),
    float: re.compile(
        r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.I
    ),
}


def _plain_numbers(command: TyperCommand, args: list[str]) -> str | None:
    """What is wrong with a number option's value that Python's int() or float() would take
    but a script did not mean ("1_0" is 10; digits of other scripts, spaces), or None."""
    kinds: dict[str, type] = {}
    for param in command.params:
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        kind = next((k for k in _PLAIN_NUMBER if annotation in (k, k | None)), None)
        if kind is not None:
            kinds.update(dict.fromkeys(getattr(param, "opts", ()), kind))
    for index, arg in enumerate(args):
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        if not arg.startswith("--") and arg[:2] in kinds and len(arg) > 2:  # -j10, its value
            name, equals, value = arg[:2], "", arg[2:]
        elif not equals:
            if arg not in kinds or index + 1 >= len(args):  # no value: click says so
                continue
            name, value = arg, args[index + 1]
        if name in kinds and not value.strip():
            return f"{name}: empty value (an unset variable in a script?)"
        if name in kinds and not _PLAIN_NUMBER[kinds[name]].fullmatch(value):
            what = "whole number" if kinds[name] is int else "number"
            return f"{name} {value!r}: not a plain {what} (ASCII digits)"
    return None


class _Command(TyperCommand):
    """click's plain help, with the options in panels (their ``rich_help_panel``) and no
    Python types: a flag shows no value, an option its metavar, an argument its metavar.
    Plain, not rich: rich's table gives every option four columns (long, short, negative
    name, type) and leaves descriptions about 20 characters at 80 columns."""

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        problem = _plain_numbers(self, args)
        if problem is not None:
            raise _OneLineUsageError(problem, ctx)
        return _one_line_usage_errors(super().parse_args, ctx, args)

    def collect_usage_pieces(self, ctx: ClickContext) -> list[str]:
        arguments = [p for p in self.get_params(ctx) if isinstance(p, TyperArgument)]
        return ["[OPTIONS]", *(p.metavar or (p.name or "").upper() for p in arguments)]

    def format_options(self, ctx: ClickContext, formatter: HelpFormatter) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                row = (param.metavar or (param.name or "").upper(), param.help or "")
                panels.setdefault("Arguments", []).append(row)
            elif (record := param.get_help_record(ctx)) is not None:
                panel = getattr(param, "rich_help_panel", None) or "Options"
                panels.setdefault(panel, []).append(record)
        for name, rows in panels.items():
            with formatter.section(name):
                formatter.write_dl(rows)


app = typer.Typer(
    name="htsep",
    cls=_Group,
    help="Music stem separation with Hybrid Transformer Demucs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(
    cls=_Group, help="List and download the named models.", rich_markup_mode=None
)
app.add_typer(models_app, name="models")

USAGE_EXIT = 2
MODEL, STEMS, OUTPUT, SPEED, BATCH = "Model", "Stems", "Output", "Speed", "Batch"


# Options several commands share, defined once.
def _option(
    default: Any, names: str, metavar: str | None, panel: str, help: str, **extra: Any
) -> Any:
    """A Typer option: its names ("-n --name"), the name of its value (None for a flag), the
    panel of the help it is listed in, and its help."""
    return typer.Option(
        default, *names.split(), metavar=metavar, rich_help_panel=panel, help=help, **extra
    )


NAME_OPTION = _option(
    "htdemucs", "-n --name", "NAME", MODEL, "Model name, signature, or path to a checkpoint file."
)
DEVICE_OPTION = _option(
    None,
    "-d --device",
    "cpu|cuda[:N]|mps",
    SPEED,
    "Where the networks run (default: the first available of cuda, mps, cpu).",
)
REPO_OPTION = _option(
    None,
    "--repo",
    "DIR",
    MODEL,
    "Folder of checkpoints (<sig>-<sha8>.th, <sig>.safetensors) and <name>.yaml bags, "
    "as demucs reads it.",
)
SHIFTS_OPTION = _option(1, "--shifts", "N", MODEL, "Random shifts to average (0: none).")
SEED_OPTION = _option(0, "--seed", "N", MODEL, "Seed of the shifts: same seed, same bytes.")
OVERLAP_OPTION = _option(
    0.25, "--overlap", "FRACTION", MODEL, "Overlap between chunks, as a fraction of a chunk."
)
SEGMENT_OPTION = _option(
    None,
    "--segment",
    "SECONDS",
    MODEL,
    "Chunk length: at least 1 s, at most the model's (default: the model's).",
)
JOBS_OPTION = _option(0, "-j --jobs", "N", SPEED, "CPU threads for torch (0: its default).")
QUIET_OPTION = typer.Option(False, "-q", "--quiet", help="No progress, only errors.")


def printable(text: str) -> str:
    """``text`` on one printable line: control characters (a newline in a file name) and
    undecodable bytes of a file name are written as escapes."""
    out = []
    for char in text:
        code = ord(char)
        if code < 0x20 or code == 0x7F:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, f"\\x{code:02x}"))
        elif 0x80 <= code <= 0x9F or code in (0x2028, 0x2029):
            # C1 controls and the Unicode line and paragraph separators: terminals and
            # str.splitlines would break the line there too.
            out.append(f"\\u{code:04x}")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(char)
    return "".join(out)


def _error(message: str) -> None:
    typer.echo(printable(f"htsep: error: {message}"), err=True)


def _warn(message: str) -> None:
    typer.echo(printable(f"htsep: warning: {message}"), err=True)


def _say(line: str) -> None:
    typer.echo(printable(line), err=True)


# How to go on without a download, per command ({fetch} and {mirror} below).
_OFFLINE = {
    "separate": "to work offline, {fetch}, {mirror}, pass checkpoint files with -n PATH or "
    "--repo DIR, or use the shipped model: -n htsep-tiny",
    "info": "to work offline, {fetch}, {mirror}, give a checkpoint file path, or try the "
    "shipped model: htsep info htsep-tiny",
    "train": "--init needs these weights: {fetch}, {mirror}, or give --init a checkpoint file "
    "path; or train from a named config without --init (--config tiny)",
    "models": "{fetch}, or {mirror}; offline, separate takes checkpoint files with -n PATH "
    "or --repo DIR, and the shipped model with -n htsep-tiny",
}
_OFFLINE["eval"] = _OFFLINE["separate"]


def _offline_advice(command: str, model: str, file_name: str) -> str:
    from htsep.zoo import cache_dir, mirror_advice

    fetch = f"run 'htsep models download {model}' on a machine with network and copy "
    fetch += f"'{file_name}' into {cache_dir()}"
    return _OFFLINE[command].format(fetch=fetch, mirror=mirror_advice())


def _message(exc: HtsepError, command: str | None, model: str | None) -> str:
    """The error's one line; a failed download ends with the command's advice."""
    if isinstance(exc, DownloadError) and exc.file_name and command and model:
        return f"{exc.problem}; {_offline_advice(command, model, exc.file_name)}"
    return str(exc)


@contextlib.contextmanager
def _reported_errors(
    interrupted: str | Callable[[], str],
    command: str | None = None,
    model: str | None = None,
    *,
    heavy: bool = True,
) -> Iterator[None]:
    """Map a command's failures to one ``htsep: error:`` line and its exit code: 2 for usage
    errors and unknown models, 1 for other failures, 130 (with ``interrupted``) for Ctrl-C.
    A failed download of ``model`` gets the advice that fits ``command``. On any failure the
    temporaries and staging folders the command left are removed (``files.remove_unfinished``)
    before the exit: an interruption can land between a file's creation and the code that
    would have removed it. SIGTERM counts as Ctrl-C throughout (``signals_as_interrupts``), in
    every command: a download stopped by ``kill`` leaves no ``.part`` file either."""
    with signals_as_interrupts(deaf_after=True):
        try:
            try:
                if heavy:
                    _import_torch()
                yield
            except BaseException:
                from htsep import files

                files.remove_unfinished()
                raise
        except (UsageError, ModelNotFoundError) as exc:
            _error(str(exc))
            raise typer.Exit(USAGE_EXIT) from None
        except HtsepError as exc:
            _error(_message(exc, command, model))
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            how = how_stopped(exc)
            said = interrupted if isinstance(interrupted, str) else interrupted()
            _error(said if how == "interrupted" else f"{how}: {said}")
            raise typer.Exit(exit_status(exc)) from None


_STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _import_torch() -> None:
    """Import torch (and torchaudio) with Ctrl-C, SIGTERM and SIGHUP held back until it is
    done: a KeyboardInterrupt raised inside torch's C++ initialisation aborts the process
    (SIGABRT, a page of C++ errors) instead of stopping it. A signal that came meanwhile is
    delivered when the import ends, and stops the command as usual. (``main`` holds them for
    every first import of torch too, wherever it happens: ``interrupts.
    hold_signals_while_torch_loads``.)"""
    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    with signals_held():
        import torch  # noqa: F401

        with contextlib.suppress(ImportError):
            import torchaudio  # noqa: F401


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"htsep {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log what happens."),
) -> None:
    """Separate music into stems (drums, bass, other, vocals, ...)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LogLine())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


class _LogLine(logging.Formatter):
    """A log record as htsep's other lines: one line, names escaped as in error lines (a cache
    folder or checkpoint name may hold a newline or an escape sequence), warnings marked."""

    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return printable(f"htsep: {kind}{record.getMessage()}")


# --- separate --------------------------------------------------------------------------------


@app.command(cls=_Command)
def separate(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(
        ...,
        metavar="INPUT...",
        show_default=False,
        help="Audio files ('-': standard input), folders (searched recursively) or glob patterns.",
    ),
    name: str = NAME_OPTION,
    repo: str | None = REPO_OPTION,
    shifts: int = SHIFTS_OPTION,
    seed: int = SEED_OPTION,
    overlap: float = OVERLAP_OPTION,
    no_split: bool = _option(
        False,
        "--no-split",
        None,
        MODEL,
        "Run the track as one chunk (tracks up to one segment, less 0.5 s with --shifts).",
    ),
    segment: float | None = SEGMENT_OPTION,
    downmix: bool = _option(
        False,
        "--downmix",
        None,
        MODEL,
        "Mix inputs with more channels than the model down to mono.",
    ),
    two_stems: str | None = _option(
        None, "--two-stems", "STEM", STEMS, "Write STEM and its complement only."
    ),
    other_method: OtherMethod = _option(
        OtherMethod.add,
        "--other-method",
        "add|minus|none",
        STEMS,
        "Complement of --two-stems: sum of the other stems (add), mix minus STEM (minus).",
    ),
    stems: str | None = _option(
        None, "--stems", "STEM,...", STEMS, "The stems to write, e.g. vocals,drums."
    ),
    out: str = _option(
        "separated",
        "-o --out",
        "DIR",
        OUTPUT,
        "Output folder; stems go under DIR/<model name>/ (-: the one stem to stdout).",
    ),
    filename: str = _option(
        "{track}/{stem}.{ext}",
        "--filename",
        "TEMPLATE",
        OUTPUT,
        "Output path template: {track}, {trackext}, {stem}, {ext}, {folder} (of a file "
        "below a folder argument; without it, stems keep that place before the template).",
    ),
    flac: bool = _option(False, "--flac", None, OUTPUT, "Write FLAC."),
    mp3: bool = _option(False, "--mp3", None, OUTPUT, "Write MP3."),
    mp3_bitrate: int = _option(320, "--mp3-bitrate", "KBPS", OUTPUT, "MP3 bitrate."),
    mp3_preset: int = _option(
        2, "--mp3-preset", "N", OUTPUT, "MP3 encoder preset: 2 best ... 7 fastest."
    ),
    int24: bool = _option(False, "--int24", None, OUTPUT, "24-bit output."),
    float32: bool = _option(False, "--float32", None, OUTPUT, "32-bit float WAV output."),
    clip_mode: ClipMode = _option(
        ClipMode.rescale,
        "--clip-mode",
        "rescale|clamp|none",
        OUTPUT,
        "rescale: one gain for all stems written when any clips; clamp: clip at +-0.99 "
        "(as demucs); none.",
    ),
    device: str | None = DEVICE_OPTION,
    jobs: int = JOBS_OPTION,
    batch_size: int | None = _option(
        None,
        "--batch-size",
        "N",
        SPEED,
        "Chunks per network call (default: 1 on CPU, from free memory on CUDA).",
    ),
    precision: str = _option(
        "fp32",
        "--precision",
        "fp32|bf16|fp16",
        SPEED,
        "Arithmetic of the networks (fp16: CUDA only); the STFT stays fp32.",
    ),
    keep_memory: bool = _option(
        False,
        "--keep-memory",
        None,
        SPEED,
        "Tune glibc to keep all freed memory for reuse (by default up to 512 MiB stays "
        "between chunks): the last page faults go, about 120 MB more peak memory with htdemucs.",
    ),
    pipeline: bool = _option(
        True,
        "--pipeline/--no-pipeline",
        None,
        SPEED,
        "Decode the next track and encode the previous one while a track is separated.",
    ),
    skip_existing: bool = _option(
        False, "--skip-existing", None, BATCH, "Skip tracks whose stems all exist already."
    ),
    overwrite: bool = _option(False, "--overwrite", None, BATCH, "Replace existing stem files."),
    shard: str | None = _option(
        None,
        "--shard",
        "K/N|auto",
        BATCH,
        "Process only the K-th of N slices of the inputs; auto: this process's slice "
        "of a SLURM job array, torchrun or srun, on its local rank's GPU.",
    ),
    json_lines: bool = typer.Option(
        False, "--json", help="Print one JSON object per track on stdout."
    ),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Separate tracks into stems.

    The stems go to <out>/<model>/<track>/<stem>.wav by default.
    """
    given = _given_options(ctx)
    options = {key: value for key, value in locals().items() if key not in ("ctx", "given")}
    with _reported_errors(
        "interrupted (finished stems are complete; none is half-written)",
        "separate",
        name,
        heavy=False,  # _separate imports torch where an interruption gets its --json records
    ):
        code = _separate(**options, given=given)
    raise typer.Exit(code)


def _check_options(opts: dict[str, Any], given: set[str]) -> tuple[OutputSettings, Any]:
    """Every option, before any work: UsageError (exit 2) for a bad value, a warning for an
    option that would be ignored. -> (output settings, separation Settings)"""
    from htsep.separator import Settings

    empty = [
        name
        for name in ("out", "name", "repo", "filename", "device", "stems", "two_stems", "shard")
        if opts[name] is not None and not str(opts[name]).strip()
    ]
    if "" in [item.strip() for item in opts["inputs"]]:
        raise UsageError("an input is an empty string (an unset variable in a script?)")
    if empty:
        names = ", ".join(_option_name(name) for name in empty)
        raise UsageError(f"{names}: empty value (an unset variable in a script?)")
    if opts["out"] == "-" and opts["json_lines"]:
        raise UsageError("-o - writes the stem to standard output, where --json would write too")
    if opts["inputs"].count("-") > 1:
        raise UsageError("'-' (standard input) can be given only once")
    if sys.stdout is None and (opts["out"] == "-" or opts["json_lines"]):
        what = "-o -" if opts["out"] == "-" else "--json"
        raise UsageError(f"{what} writes to standard output, which is closed")
    if opts["out"] == "-" and sys.stdout is not None and sys.stdout.isatty():
        raise UsageError(
            "-o - writes the stem's bytes to standard output, which is a terminal: "
            "redirect it to a file or a program (> stem.wav, | player -)"
        )
    for first, second in (("int24", "float32"), ("flac", "mp3")):
        if opts[first] and opts[second]:
            raise UsageError(f"--{first} and --{second} exclude each other")
    if opts["mp3"] and (opts["int24"] or opts["float32"]):
        raise UsageError(f"--{'int24' if opts['int24'] else 'float32'} does not apply to --mp3")
    if opts["float32"] and opts["flac"]:
        raise UsageError("--float32 is for WAV output only (FLAC has no float samples)")
    if opts["two_stems"] and opts["stems"]:
        raise UsageError("--two-stems and --stems exclude each other")
    # An option that does not apply is ignored, as the warning says: its value too, which is
    # then not checked (the defaults stand in).
    for ignored, one, several in [
        (
            not opts["mp3"] and given & {"mp3_bitrate", "mp3_preset"},
            "applies only with --mp3",
            "apply only with --mp3",
        ),
        (
            not opts["two_stems"] and given & {"other_method"},
            "applies only with --two-stems",
            "",
        ),
        (
            opts["no_split"] and given & {"overlap", "segment"},
            "does not apply with --no-split",
            "do not apply with --no-split",
        ),
        (
            opts["out"] == "-" and given & {"filename", "skip_existing", "overwrite"},
            "does not apply with -o -",
            "do not apply with -o -",
        ),
        (
            opts["shifts"] == 0 and given & {"seed"},
            "chooses the random shifts, and --shifts 0 makes none",
            "",
        ),
    ]:
        if ignored:
            typed = [_option_name(name) for name in sorted(ignored)]
            listed = ", ".join(typed[:-1]) + " and " + typed[-1] if len(typed) > 1 else typed[0]
            _warn(f"{listed} {one if len(typed) == 1 else several}; ignored")
            for name in ignored:
                opts[name] = _separate_default(name)
    if opts["mp3"] and "mp3_preset" in given:
        _warn(
            "--mp3-preset has no effect: libsndfile's MP3 encoder has no speed/quality "
            "preset (--mp3-bitrate sets the quality)"
        )
    if not 0 <= opts["jobs"] <= 1024:
        raise UsageError(f"--jobs must be in 0..1024, got {opts['jobs']}")
    two_stems = opts["two_stems"].strip() if opts["two_stems"] else None
    with _option_names():
        output = OutputSettings(
            format="flac" if opts["flac"] else "mp3" if opts["mp3"] else "wav",
            bits=32 if opts["float32"] else 24 if opts["int24"] else 16,
            clip_mode=opts["clip_mode"],
            two_stems=two_stems,
            other_method=opts["other_method"],
            template=opts["filename"],
            overwrite=opts["overwrite"],
            skip_existing=opts["skip_existing"],
            mp3_bitrate=opts["mp3_bitrate"],
            mp3_preset=opts["mp3_preset"],
            downmix=opts["downmix"],
        )
        stems = _comma_list(opts["stems"], "--stems") if opts["stems"] else None
        settings = Settings.check(
            shifts=opts["shifts"],
            overlap=opts["overlap"],
            split=not opts["no_split"],
            segment=opts["segment"],
            seed=opts["seed"],
            batch_size=opts["batch_size"],
            precision=opts["precision"],
            stems=[two_stems] if two_stems else stems,
        )
    return output, settings


def _option_name(name: str) -> str:
    """``separate``'s parameter ``name`` as typed: ``--skip-existing``."""
    return "--" + name.replace("_", "-")


def _separate_default(name: str) -> Any:
    """The default of ``separate``'s parameter ``name``."""
    declared = inspect.signature(separate).parameters[name].default
    return getattr(declared, "default", declared)


@contextlib.contextmanager
def _option_names() -> Iterator[None]:
    """Name the option as typed in a UsageError of the library's checks."""
    try:
        yield
    except UsageError as exc:
        message = str(exc)
        for word, option in _SETTING_OPTIONS.items():
            if message.startswith(word + " "):
                message = option + message[len(word) :]
                break
        raise UsageError(message) from None


_SETTING_OPTIONS = {
    "shifts": "--shifts",
    "overlap": "--overlap",
    "segment": "--segment",
    "seed": "--seed",
    "batch size": "--batch-size",
    "precision": "--precision",
    "mp3 bitrate": "--mp3-bitrate",
    "mp3 preset": "--mp3-preset",
}


@dataclasses.dataclass
class _Progress:
    """How far ``separate`` got, for the --json records of an interruption: the tracks once
    the inputs are searched, their model, and the indices of the tracks reported already."""

    inputs: list[str]
    model: str | None  # the model's name once found; before, as given (None: the default)
    tracks: list[Track] | None = None
    reported: set[int] = dataclasses.field(default_factory=set)
    sharded: bool = False

    def interrupted_records(self) -> None:
        """The records not printed yet: each track's, or before the inputs were searched
        (torch's import, standard input's spooling), one per input as given; none then with
        --shard, whose slice of the inputs is not known yet."""
        from htsep import zoo  # torch is imported whole by now (_import_torch)

        global _records_given
        _records_given = True
        if self.tracks is None and self.sharded:
            return
        if self.tracks is None:
            self.tracks = [Track(source=item, path=None) for item in self.inputs]
            self.reported.clear()
        _interrupted_records(self.tracks, self.model or zoo.DEFAULT_MODEL, self.reported)


# Whether an interruption's --json records were printed (``_Progress.interrupted_records``).
_records_given = False


def early_interrupted_records(argv: list[str]) -> None:
    """The --json records of a ``separate`` stopped by a signal before it began (while the
    command line was imported, or its options read), one per input as given, interrupted,
    as ``_Progress`` gives them; nothing when the arguments do not parse, are not a separate
    with --json, or the records were given already. Signals must be ignored by now."""
    if _records_given:
        return
    try:
        group = typer.main.get_command(app)
        context = group.make_context("htsep", demucs_style(argv), resilient_parsing=True)
        words = [*context._protected_args, *context.args]  # the command and what follows
        name, command, rest = group.resolve_command(context, words)  # type: ignore[attr-defined]
        if name != "separate" or command is None:
            return
        params = command.make_context(name, rest, parent=context, resilient_parsing=True).params
    except Exception:  # arguments that do not parse: no records, as for a usage error
        return
    if params.get("json_lines") and params.get("inputs"):
        inputs, shard = list(params["inputs"]), params.get("shard")
        _Progress(inputs, params.get("name"), sharded=bool(shard)).interrupted_records()


def _separate(**opts: Any) -> int:
    progress = _Progress(list(opts["inputs"]), opts["name"], sharded=bool(opts["shard"]))
    try:
        _import_torch()
        return _separate_checked(progress, **opts)
    except KeyboardInterrupt:
        if opts["json_lines"]:
            progress.interrupted_records()
        raise


# Where standard input that could not be kept is searched for: under /dev/null, which is never
# a folder, so that it becomes a failed track at its place among the inputs.
_UNSPOOLED = Path(os.devnull, "htsep-stdin")


def _separate_checked(progress: _Progress, **opts: Any) -> int:
    from htsep import files
    from htsep.errors import AudioError

    output, settings = _check_options(opts, opts.pop("given"))
    if opts["shard"]:
        opts["shard"], opts["device"] = _shard(opts["shard"], opts["device"])
    if opts["out"] == "-" and "-" in opts["inputs"] and sys.stdin is not None:
        with contextlib.suppress(OSError):
            _refuse_stdout_input("-", os.fstat(0))
    with contextlib.ExitStack() as cleanup:
        if "-" in opts["inputs"]:
            try:
                spooled = _spool_stdin()
            except AudioError as exc:  # a full temporary folder: this input fails alone
                spooled, opts["stdin_error"] = _UNSPOOLED, str(exc)
            else:
                cleanup.callback(spooled.unlink, missing_ok=True)
            opts["inputs"] = [str(spooled) if item == "-" else item for item in opts["inputs"]]
            opts["stdin"] = spooled
        if opts["out"] == "-":
            staging = files.StagingFolder(tempfile.gettempdir())
            cleanup.callback(staging.cleanup)
            opts["out"], opts["stdout"] = str(staging.path), True
        return _separate_tracks(opts, output, settings, progress)


def _refuse_stdout_input(source: str, input_stat: os.stat_result | None) -> None:
    """-o - with standard output redirected into the input file itself (``>> song.wav``,
    ``1<> song.wav``): the stem would overwrite or extend the track. Refused, as cat does."""
    from htsep.errors import AudioError

    try:
        out = os.fstat(sys.stdout.fileno()) if sys.stdout is not None else None
    except (OSError, ValueError):
        return
    if out is None or input_stat is None or not stat.S_ISREG(out.st_mode):
        return
    if (out.st_dev, out.st_ino) == (input_stat.st_dev, input_stat.st_ino):
        raise AudioError(f"{source}: standard output is this file; the stem would overwrite it")


def _shard(text: str, device: str | None) -> tuple[Shard, str | None]:
    """--shard K/N as given, or auto: this process's slice of a job and its GPU, read from the
    environment before any work. -> (shard, device)"""
    if text.strip() != "auto":
        return Shard(*parse_shard(text)), device
    return shard_from_environment(os.environ), shard_device(device, os.environ)


def _spool_stdin() -> Path:
    """Standard input in a temporary file: the first pass needs the whole track."""
    from htsep import files
    from htsep.errors import AudioError

    if sys.stdin is None:  # Python's sys.stdin when descriptor 0 was closed at start
        raise UsageError("'-' reads audio from standard input, which is closed")
    if sys.stdin.isatty():
        raise UsageError("'-' reads audio from standard input, which is a terminal")
    folder = tempfile.gettempdir()
    try:
        return files.spool(sys.stdin.buffer, Path(folder) / "htsep-stdin")
    except OSError as exc:
        raise AudioError(
            f"-: cannot keep standard input in {folder}: {exc.strerror or exc}"
        ) from None


def _separate_tracks(
    opts: dict[str, Any], output: OutputSettings, settings: Any, progress: _Progress
) -> int:
    from htsep import zoo

    quiet, to_stdout = opts["quiet"], opts.get("stdout", False)
    spec = zoo.find_model(opts["name"], repo=opts["repo"])
    folder = output_folder(opts["out"], spec.name)
    progress.model = folder.name
    tracks = find_inputs(opts["inputs"], exclude=folder)
    for track in tracks:
        if track.path is not None and track.path == opts.get("stdin"):
            track.source, track.name = "-", "stdin"
        elif track.path is None and "stdin_error" in opts and track.source == str(_UNSPOOLED):
            track.source, track.name, track.error = "-", "stdin", opts["stdin_error"]
    progress.tracks = tracks
    if to_stdout and len(tracks) != 1:
        raise UsageError(f"-o - writes one track to standard output, not {len(tracks)}")
    if to_stdout and tracks[0].path is not None and tracks[0].source != "-":
        with contextlib.suppress(OSError):
            _refuse_stdout_input(tracks[0].source, os.stat(tracks[0].path))
    # Usage errors of the plan, before the model is loaded (or downloaded) and over every
    # input, not only this process's --shard.
    if not to_stdout:
        check_track_clashes(tracks, output, folder)
        stems = _stem_count(spec.sources, output, settings.stems)
        if stems is not None:
            check_template(output.template, output.ext, stems)
    total = len(tracks)
    if opts["shard"]:  # from here on, the records and warnings of this process's inputs only
        tracks = take_shard(tracks, opts["shard"].index, opts["shard"].count)
        progress.tracks = tracks
    _warn_aliases(tracks)
    if not to_stdout:
        _check_out_folder(folder, tracks, json_lines=opts["json_lines"])
    if opts["shard"]:
        shard = opts["shard"]
        why = f" ({shard.origin})" if shard.origin else ""
        taken = f"shard {shard.index}/{shard.count}{why}"
        if not tracks:
            if not quiet:
                _say(f"htsep: {taken} is empty ({total} input"
                     f"{'s' if total != 1 else ''}); nothing to do")  # fmt: skip
            return 0
        if shard.origin and not quiet:
            _say(f"htsep: {taken}: {len(tracks)} of {total} input{'s' if total != 1 else ''}")
    if tracks and all(t.error is not None for t in tracks):
        for track in tracks:  # nothing to separate: do not load (or download) the model
            track.status = "failed"
            _error(track.error or "")
            if opts["json_lines"]:
                _echo_records(track, folder.name)
        _say(f"htsep: 0 separated, 0 skipped, {len(tracks)} failed (0.0 s)")
        return 1
    return _run_tracks(opts, tracks, output, settings, folder, progress.reported)


def _run_tracks(
    opts: dict[str, Any],
    tracks: list[Track],
    output: OutputSettings,
    settings: Any,
    folder: Path,
    reported: set[int],
) -> int:
    """Load the model and separate ``tracks``; ``reported`` gets the index of each track
    whose --json records are written."""
    import torch

    from htsep.separator import Separator

    quiet, to_stdout = opts["quiet"], opts.get("stdout", False)
    if opts["jobs"]:
        torch.set_num_threads(opts["jobs"])
    try:
        separator = Separator(
            opts["name"],
            repo=opts["repo"],
            device=opts["device"],
            **dataclasses.asdict(settings),
            progress=not quiet,
            keep_memory=opts["keep_memory"],
        )
    except HtsepError as exc:
        if opts["json_lines"] and not isinstance(exc, UsageError):
            for track in tracks:  # every input fails with the model, each with its record
                track.status = "failed"
                track.error = track.error or f"{track.source}: no model to separate it: {exc}"
                _echo_records(track, folder.name)
        raise
    report = _Report(
        len(tracks),
        separator.name,
        quiet=quiet,
        json_lines=opts["json_lines"],
        staging=opts["out"] if to_stdout else None,
        reported=reported,
    )
    batch = Batch(separator, opts["out"], output, pipeline=opts["pipeline"], events=report)
    if to_stdout and len(batch.names) != 1:
        raise UsageError(
            f"-o - writes one stem to standard output, not {len(batch.names)} "
            f"({', '.join(batch.names)}): "
            "choose it with --stems STEM, or --two-stems STEM --other-method none"
        )
    batch.plan(tracks)  # a clash is a usage error before the first line
    if not quiet:
        networks = separator.members_running
        where = "stem to standard output" if to_stdout else f"stems in {folder}"
        _say(f"htsep: {separator.name} ({networks} network{'s' if networks > 1 else ''}) "
             f"on {separator.device}; {where}")  # fmt: skip
    started = time.perf_counter()
    batch.run(tracks)
    failed = sum(t.status == "failed" for t in tracks)
    skipped = sum(t.status == "skipped" for t in tracks)
    if not quiet or failed:
        _say(f"htsep: {len(tracks) - failed - skipped} separated, {skipped} skipped, "
             f"{failed} failed ({time.perf_counter() - started:.1f} s)")  # fmt: skip
    return 1 if failed or not tracks else 0


def _check_out_folder(folder: Path, tracks: list[Track], *, json_lines: bool) -> None:
    """An <out> that cannot be made (a part of it is a file, a named pipe, a link to
    nothing) fails the command before the model is loaded or downloaded, not each track
    after it; with --json every input still gets its record."""
    from htsep import files

    blocker = files.in_the_way(folder)
    if blocker is None:
        return
    message = f"cannot create the output folder {folder}: {blocker}"
    if json_lines:
        for track in tracks:
            track.status = "failed"
            track.error = track.error or f"{track.source}: {message}"
            _echo_records(track, folder.name)
    raise HtsepError(message)


def _interrupted_records(tracks: list[Track], model: str, reported: set[int]) -> None:
    """On Ctrl-C or a signal, the records of the tracks not reported yet, so that every input
    still has one: interrupted for those that did not end, skipped or failed for those whose
    fate the plan had settled (outputs there already, no such file); a stdout that fails now
    is let go."""
    try:
        for index, track in enumerate(tracks):
            if index in reported:
                continue
            if track.status == "pending":
                track.status = "interrupted" if track.error is None else "failed"
            _echo_records(track, model)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _warn_aliases(tracks: list[Track]) -> None:
    """One warning per input that reached a file named before (a few, then their count)."""
    pairs = [(alias, track.source) for track in tracks for alias in track.aliases]
    for alias, first in pairs[:3]:
        if alias == first:  # `album album/CD1`: two arguments whose searches overlap
            _warn(f"{alias}: reached again by another folder or pattern; separated once")
        else:
            _warn(f"{alias}: the same file as {first}; separated once")
    if len(pairs) > 3:
        _warn(f"{len(pairs) - 3} more inputs reach files named before; each is separated once")


def _echo_records(track: Track, model: str) -> None:
    for record in track.records(model):
        typer.echo(json.dumps(record))


def _stem_count(
    sources: tuple[str, ...] | None, output: OutputSettings, stems: list[str] | None
) -> int | None:
    """How many stems each track gets, where that is known before the model is loaded."""
    if output.two_stems is not None:
        return 1 if output.other_method == OtherMethod.none else 2
    if stems:
        return len(set(stems))
    return None if sources is None else len(sources)


class _Report(BatchEvents):
    """A batch on the terminal: a progress bar per track, one line when each is done (errors
    on stderr, JSON records on stdout)."""

    def __init__(
        self,
        total: int,
        model: str,
        *,
        quiet: bool,
        json_lines: bool,
        staging: str | None = None,
        reported: set[int] | None = None,
    ) -> None:
        self.total, self.model, self.quiet, self.json_lines = total, model, quiet, json_lines
        # The tracks whose records are written: on an interruption, the others get theirs.
        self.reported = reported if reported is not None else set()
        self.bar: Any = None  # the tqdm progress bar on screen
        # -o -: the hidden folder the stem is made in, gone once the command ends; errors
        # name the temporary folder instead (where a full disk would be).
        self.staging = staging

    def started(self, index: int, track: Track, seconds: float) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=seconds,
            unit="s",
            desc=printable(f"[{index + 1}/{self.total}] {track.label}"),
            leave=False,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]",
        )

    def progress(self, index: int, seconds: float) -> None:
        if self.bar is not None:
            # Never past the total: the sum of the parts may exceed it by a rounding, and tqdm
            # prints a warning of its own ("clamping frac to range [0, 1]").
            self.bar.update(max(min(seconds, self.bar.total - self.bar.n), 0))

    def separated(self, index: int) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finished(self, index: int, track: Track) -> None:
        if track.status == "ok" and self.staging is not None:
            # -o -: the track is done only once its stem is on standard output.
            try:
                _copy_to_stdout(Path(track.outputs[0]))
            except HtsepError as exc:
                track.status, track.error = "failed", f"{track.source}: {exc}"
        if track.status == "failed":
            error = track.error or ""
            if self.staging is not None:
                where = f"the stem for standard output (made in {os.path.dirname(self.staging)})"
                error = re.sub(re.escape(self.staging) + r"[^:]*", lambda _: where, error)
            self._line(f"htsep: error: {error}", err=True)
        elif track.status == "ok" and not self.quiet:
            stems = len(track.outputs)
            self._line(
                f"[{index + 1}/{self.total}] {track.label}: {stems} stem{'s' if stems != 1 else ''}"
                f" in {track.seconds:.1f} s ({track.speed:.2f}x real time)",
                err=True,
            )
        if self.json_lines:
            for record in track.records(self.model):
                self._line(json.dumps(record), err=False)
        self.reported.add(index)

    def _line(self, line: str, err: bool) -> None:
        """Through tqdm while a bar is on screen, so that the bar is redrawn below the line."""
        line = printable(line)
        if self.bar is None:
            typer.echo(line, err=err)
        else:
            stream = sys.stderr if err else sys.stdout
            self.bar.write(line, file=stream)
            stream.flush()  # a reader of --json sees each record as its track ends


def _copy_to_stdout(path: Path) -> None:
    from htsep import files

    try:
        files.copy_into(path, sys.stdout.buffer)
    except OSError as exc:
        _abandon_stdout()  # say so once, below
        if isinstance(exc, BrokenPipeError):  # the reader went away
            raise HtsepError("standard output was closed before the stem was written") from None
        reason = exc.strerror or type(exc).__name__
        raise HtsepError(f"cannot write the stem to standard output: {reason}") from None


# --- models and info -------------------------------------------------------------------------


@models_app.callback(invoke_without_command=True)
def models_list(ctx: typer.Context) -> None:
    """List the named models: sources, members, and whether they are downloaded."""
    if ctx.invoked_subcommand is None:
        _list_models()


def _list_models() -> None:
    from htsep import zoo

    for spec in zoo.registry_models():
        cached = sum(zoo.is_cached(member) for member in spec.members)
        state = (
            "shipped"
            if all(member.path is not None for member in spec.members)
            else "cached"
            if cached == len(spec.members)
            else (f"{cached}/{len(spec.members)} cached" if cached else "not downloaded")
        )
        sources = ", ".join(spec.sources or ())
        typer.echo(
            f"{spec.name:<14} {len(spec.members)} member"
            f"{'s' if len(spec.members) > 1 else ' '}  {state:<15} {sources}"
        )
        if spec.description:
            typer.echo(f"{'':<14} {spec.description}")


@models_app.command("list", cls=_Command)
def models_list_command() -> None:
    """List the named models (the same as htsep models)."""
    _list_models()


@models_app.command("download", cls=_Command)
def models_download(
    names: list[str] = typer.Argument(
        ..., metavar="NAME...", help="Model names to fetch ahead of time."
    ),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
) -> None:
    """Download models into the cache (HTSEP_CACHE or ~/.cache/htsep)."""
    from htsep import zoo

    failed = False
    with _reported_errors("interrupted (nothing half-downloaded is left)", "models", heavy=False):
        # Every name first: an unknown one is a usage error before any download.
        for name in names:
            if zoo.names_a_file(name):  # it was "downloaded" whatever the file held
                raise UsageError(f"{name}: a checkpoint file's path, not a model name: nothing "
                                 "to download (give it to -n as it is)")  # fmt: skip
        specs = [(name, zoo.find_model(name)) for name in names]
        for name, spec in specs:
            for member in spec.members:
                try:
                    path = zoo.fetch(member, progress=not quiet)
                except HtsepError as exc:
                    _error(_message(exc, "models", name))
                    failed = True
                    continue
                if not quiet:
                    typer.echo(f"{name}: {member.signature} -> {path}", err=True)
    raise typer.Exit(1 if failed else 0)


@app.command("info", cls=_Command)
def info(
    checkpoint: str = typer.Argument(
        ...,
        metavar="CHECKPOINT",
        help="A checkpoint file, or the name of a one-network model (e.g. htsep-tiny).",
    ),
) -> None:
    """Load a checkpoint and print what it contains."""
    from htsep import zoo
    from htsep.checkpoint import load_model

    with _reported_errors("interrupted", "info", checkpoint):
        zoo.find_model(checkpoint)  # as -n takes it: a missing file is a usage error (exit 2)
        model = load_model(checkpoint)
    params = sum(p.numel() for p in model.parameters())
    typer.echo(f"sources: {', '.join(model.sources)}")
    typer.echo(f"sample rate: {model.sample_rate} Hz, channels: {model.audio_channels}")
    typer.echo(f"segment: {model.segment} s ({model.segment_length} samples)")
    typer.echo(f"parameters: {params:,}")


# --- eval ------------------------------------------------------------------------------------


class Split(str, Enum):
    train = "train"
    test = "test"


@app.command("eval", cls=_Command)
def eval_command(
    ctx: typer.Context,
    dataset_arg: str = typer.Argument(
        ...,
        metavar="DATASET",
        help="Dataset folder in the MUSDB18-HQ layout: <split>/<track>/mixture.wav, ...",
    ),
    name: str = NAME_OPTION,
    repo: str | None = REPO_OPTION,
    shifts: int = SHIFTS_OPTION,
    seed: int = SEED_OPTION,
    overlap: float = OVERLAP_OPTION,
    segment: float | None = SEGMENT_OPTION,
    split: Split = _option(
        Split.test, "--split", "train|test", "Dataset", "Which part of the dataset."
    ),
    tracks: str | None = _option(
        None, "--tracks", "TRACK,...", "Dataset", "The tracks to evaluate (default: all)."
    ),
    sources: str | None = _option(
        None,
        "--sources",
        "SOURCE,...",
        "Dataset",
        "The sources to score (default: every source file of the tracks).",
    ),
    device: str | None = DEVICE_OPTION,
    museval: bool = typer.Option(
        False,
        "--museval",
        help="Also compute museval's SDR (median over 1 s frames; slow; pip install museval).",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print the scores as one JSON object on stdout."
    ),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Score a model on a dataset.

    The score is the nSDR (dB, MDX challenge) per track and source.
    """
    from htsep.data import find_tracks
    from htsep.evaluate import choose_tracks, evaluate, evaluation_sources, import_museval
    from htsep.separator import Separator

    def report_track(index: int, track: DatasetTrack, scores: dict[str, float]) -> None:
        if not quiet:
            values = ", ".join(f"{source} {value:.2f}" for source, value in scores.items())
            _say(f"[{index + 1}/{len(chosen)}] {track.name}: {values}")

    dataset = Path(dataset_arg)
    folder = dataset / split.value
    with _reported_errors("interrupted", "eval", name):
        if not dataset_arg.strip():
            raise UsageError("DATASET is an empty string (an unset variable in a script?)")
        given = {"name": name, "repo": repo, "device": device, "tracks": tracks,
                 "sources": sources}  # fmt: skip
        empty = [key for key, value in given.items() if value is not None and not value.strip()]
        if empty:
            listed = ", ".join(_option_name(key) for key in empty)
            raise UsageError(f"{listed}: empty value (an unset variable in a script?)")
        if sys.stdout is None:  # closed (>&-): the scores would be lost
            what = "--json" if json_output else "the score table"
            raise UsageError(f"{what} writes to standard output, which is closed")
        wanted = _eval_sources(sources) if sources is not None else None
        if shifts == 0 and "seed" in _given_options(ctx):
            _warn("--seed chooses the random shifts, and --shifts 0 makes none; ignored")
            seed = 0
        if museval:
            import_museval()
        names, found = find_tracks(dataset, split.value, wanted)
        picked = _comma_list(tracks, "--tracks") if tracks is not None else None
        chosen = choose_tracks(found, picked, folder)
        separator = Separator(
            name,
            repo=repo,
            device=device,
            shifts=shifts,
            overlap=overlap,
            segment=segment,
            seed=seed,
            progress=not quiet,
        )
        names = evaluation_sources(separator, names)
        unscored = [source for source in separator.sources if source not in names]
        if wanted is None and unscored:  # a stem missing from a lone track looks the same
            _warn(f"{', '.join(unscored)}: no stem in the dataset's tracks, so not scored "
                  "(--sources lists what to score)")  # fmt: skip
        if not quiet:
            _say(f"htsep: {separator.name} on {separator.device}: {len(chosen)} track"
                 f"{'s' if len(chosen) > 1 else ''} of {folder}")  # fmt: skip
        report = evaluate(separator, chosen, names, framewise=museval, on_track=report_track)
    if json_output:
        record = {"model": report.model, "dataset": str(dataset), "split": split.value}
        typer.echo(json.dumps({**record, **report.as_dict()}))
        return
    model = printable(report.model)
    typer.echo(f"nSDR (dB) of {model} on {printable(str(folder))}")
    typer.echo(report.table(escape=printable))
    if report.sdr is not None:
        typer.echo(f"\nSDR (dB, museval: median over 1 s frames) of {model}")
        typer.echo(report.table(museval=True, escape=printable))


def _eval_sources(text: str) -> list[str]:
    """--sources as a list; a bad value (a name twice, the mixture) is a UsageError."""
    from htsep.data import requested_sources

    names = _comma_list(text, "--sources")
    try:
        return requested_sources(names)
    except UsageError as exc:
        raise UsageError(f"--sources {text!r}: {exc}") from None


def _comma_list(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{option} {text!r}: expected comma-separated names")
    return items


# --- train -----------------------------------------------------------------------------------


@app.command("train", cls=_Command)
def train(
    ctx: typer.Context,
    dataset: str = typer.Argument(
        ...,
        metavar="DATASET",
        help="Dataset folder in the MUSDB18-HQ layout: train/<track>/{mixture,<source>}.wav.",
    ),
    config: str | None = _option(
        None,
        "--config",
        "tiny|htdemucs|FILE",
        MODEL,
        "Architecture: a named size or a YAML/JSON file (default: tiny).",
    ),
    init: str | None = _option(
        None,
        "--init",
        "NAME|FILE",
        MODEL,
        "Fine-tune this checkpoint (a model name or file) instead.",
    ),
    repo: str | None = _option(None, "--repo", "DIR", MODEL, "Folder of checkpoints for --init."),
    out: str = _option(..., "--out", "DIR", "Run", "Run folder: checkpoints, metrics.jsonl."),
    steps: int | None = _option(
        None, "--steps", "N", "Run", "Train up to this many steps (default: 1000, or the run's)."
    ),
    resume: bool = _option(
        False, "--resume", None, "Run", "Continue the run in --out with its saved options."
    ),
    log_every: int = _option(10, "--log-every", "STEPS", "Run", "Steps between metrics lines."),
    save_every: int = _option(100, "--save-every", "STEPS", "Run", "Steps between checkpoints."),
    valid_every: int = _option(
        0,
        "--valid-every",
        "STEPS",
        "Run",
        "Steps between validations on test/ (0: at the end only).",
    ),
    valid_tracks: int = _option(
        0, "--valid-tracks", "N", "Run", "Test tracks used for validation (0: all)."
    ),
    batch_size: int = _option(
        4, "--batch-size", "N", "Training", "Examples per step, all processes."
    ),
    lr: float = _option(3e-4, "--lr", "RATE", "Training", "Adam learning rate."),
    ema: float = _option(
        0.0,
        "--ema",
        "DECAY",
        "Training",
        "Decay of an exponential moving average of the weights (0: off).",
    ),
    seed: int = _option(
        0, "--seed", "N", "Training", "Seed of all randomness: same seed, same run."
    ),
    device: str | None = DEVICE_OPTION,
    jobs: int = JOBS_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Train or fine-tune a model.

    Under torchrun, the run is shared by many processes (DDP).
    """

    def interrupted() -> str:
        if (Path(out) / "state.pt").is_file():
            return "interrupted: continue the run with --resume (from its last checkpoint)"
        return "interrupted before the run's first checkpoint: the same command starts it over"

    with _reported_errors(interrupted, "train", init):
        for what, value in (("DATASET", dataset), ("--out", out)):
            if not value.strip():
                raise UsageError(f"{what} is an empty string (an unset variable in a script?)")
        _train(ctx, Path(out), device=device, jobs=jobs, resume=resume, quiet=quiet)


def _given_options(ctx: typer.Context) -> set[str]:
    """The parameters the user typed (not left at their defaults)."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    # Compared by name: typer may bring its own copy of click's ParameterSource.
    return {name for name, source in sources.items() if source and source.name != "DEFAULT"}


def _train(
    ctx: typer.Context, run_dir: Path, *, device: str | None, jobs: int, resume: bool, quiet: bool
) -> None:
    import torch

    from htsep.model.kernels import cpu_products
    from htsep.train import Trainer, TrainOptions, run_options

    if not 0 <= jobs <= 1024:
        raise UsageError(f"--jobs must be in 0..1024, got {jobs}")
    cpu_products()  # a bad HTSEP_CPU_PRODUCTS is refused before any work
    if jobs:
        torch.set_num_threads(jobs)
    fields = {field.name for field in dataclasses.fields(TrainOptions)}
    values = {key: value for key, value in ctx.params.items() if key in fields}
    options = run_options(run_dir, values, _given_options(ctx), resume=resume)
    trainer = Trainer(options, run_dir, device=device, resume=resume, progress=not quiet)
    result = trainer.run()
    if not quiet and trainer.processes.main:
        _say(f"step {result.step}: loss {result.loss:.4f}, {result.seconds:.1f} s; "
             f"model in {run_dir / 'model.safetensors'}")  # fmt: skip
    if trainer.processes.world > 1:
        # Every file is written and closed. Skip the interpreter's teardown: torch's gloo
        # threads occasionally abort a worker there (std::terminate after the last Python
        # frame), which torchrun would report as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


_ROOT_FLAGS = ("-v", "--verbose")
_ROOT_EAGER = ("--version", "--help")


def _merged_stems(args: list[str]) -> list[str]:
    """``--stems`` given more than once, as one list in order (``--stems vocals --stems drums``
    is ``--stems vocals,drums``; click would keep the last alone)."""
    values: list[str] = []
    out: list[str] = []
    first = None
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--stems" and index + 1 < len(args):
            values.append(args[index + 1])
            index += 2
        elif arg.startswith("--stems="):
            values.append(arg.partition("=")[2])
            index += 1
        else:
            out.append(arg)
            index += 1
            continue
        if first is None:
            first = len(out)
    if len(values) < 2 or first is None:
        return args
    # An empty one stays empty, for the unset-variable check.
    merged = "" if any(not value.strip() for value in values) else ",".join(values)
    return out[:first] + ["--stems", merged] + out[first:]


@functools.cache
def _click_commands() -> dict[str, Any]:
    """The commands as click sees them, built once (6 ms each time typer builds them)."""
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _command_options(*, flags: bool, short: bool) -> set[str]:
    """The options of every command: flags (-q) or those that take a value (-n, --out);
    one-letter or long."""
    found: set[str] = set()
    for command in _click_commands().values():
        for param in command.params:
            if bool(getattr(param, "is_flag", not flags)) is flags:
                found |= {name for name in param.opts if (len(name) == 2) is short}
    return found


def demucs_style(argv: list[str]) -> list[str]:
    """The arguments as Typer expects them, from habits of demucs users: a first argument that
    is not a command starts ``separate`` (``htsep song.mp3 -n htdemucs_ft``), and ``-v`` works
    after the command too (it is the root's option)."""
    args = list(argv)
    cut = args.index("--") if "--" in args else len(args)  # after "--" everything is an input
    # "-o=DIR": demucs's argparse reads DIR, click "=DIR" (a folder named "=DIR").
    shorts = _command_options(flags=False, short=True)
    spread: list[str] = []
    for arg in args[:cut]:
        option, equals, value = arg.partition("=")
        spread += [option, value] if equals and option in shorts else [arg]
    args, cut = spread + args[cut:], len(spread)
    # -v among the options, not as an option's value (-o -v); in a cluster of flags (-qv).
    flags = _command_options(flags=True, short=True) | {"-v"}
    valued = shorts | _command_options(flags=False, short=False)
    verbose, kept, taken = [], [], False
    for arg in args[:cut]:
        cluster = re.fullmatch(r"-[A-Za-z]{2,}", arg) is not None and "v" in arg[1:]
        if not taken and cluster and all(f"-{letter}" in flags for letter in arg[1:]):
            verbose.append("-v")
            others = arg[1:].replace("v", "")
            kept += [f"-{others}"] if others else []
        elif not taken and arg in _ROOT_FLAGS:
            verbose.append(arg)
        else:
            kept.append(arg)
        taken = not taken and arg in valued
    options = _merged_stems(kept)
    rest = options + args[cut:]
    commands = {
        command.name or getattr(command.callback, "__name__", "")
        for command in app.registered_commands
    }
    commands |= {group.name or "" for group in app.registered_groups}
    if rest and rest[0] not in commands and rest[0] not in _ROOT_EAGER:
        command = _command_after_options(rest[: len(options)], commands)
        if command is not None:  # `htsep -q separate song.wav`: options before the command
            rest = [rest[command], *rest[:command], *rest[command + 1 :]]
        else:
            rest = ["separate", *rest]
    return verbose[:1] + rest


def _command_after_options(args: list[str], commands: set[str]) -> int | None:
    """The index of a command name written after options (`htsep -q separate song.wav`), or
    None: the first argument that is neither an option nor an option's value, when it names a
    command and no file or folder of that name is here (then it is an input, as before)."""
    valued: set[str] = set()
    for param in _click_commands()["separate"].params:
        if getattr(param, "is_flag", True) is False:
            valued |= set(param.opts)
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("-") and arg != "-":
            index += 2 if arg in valued else 1
            continue
        return index if arg in commands and not os.path.lexists(arg) else None
    return None


def main() -> None:
    from htsep.quiet import own_stderr, standard_descriptors

    hold_signals_while_torch_loads()

    if 2 in standard_descriptors():  # no one to read messages: they go to /dev/null
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    own_stderr()
    try:
        os.getcwd()
    except FileNotFoundError:  # MKL's loader would die in `import torch`, exit 2, no reason
        _error("the current folder was removed: cd into a folder that exists and run again")
        _exit(1)
    # A signal outside a command's _reported_errors (while the options are parsed, say), where
    # typer turns the KeyboardInterrupt into a silent exit 130, still gets its message and
    # its exit status.
    with signals_as_interrupts(deaf_after=True) as stopped:
        try:
            app(args=demucs_style(sys.argv[1:]), prog_name="htsep")
        except KeyboardInterrupt as exc:
            _interrupted(exc)
        except SystemExit as done:
            if stopped and done.code == 130:
                signum = stopped[0]
                _interrupted(KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum))
            if done.code == 1 and _click_caught_a_broken_pipe():
                _stdout_failed(errno.EPIPE)
            _exit(done.code)
        except OSError as exc:
            # A write to standard output failed outside the -o - copy (--json lines, info,
            # the help): a full disk behind a redirection, a reader gone. Any other OSError is
            # a bug.
            if not _writing_stdout(exc):
                raise
            _stdout_failed(exc.errno, exc.strerror or type(exc).__name__)
    _exit(0)


def _click_caught_a_broken_pipe() -> bool:
    """Whether click ended the command for a write to a reader that left (EPIPE): it turns
    that into a silent exit 1, after wrapping standard output in its PacifyFlushWrapper."""
    from typer._click.utils import PacifyFlushWrapper

    return isinstance(sys.stdout, PacifyFlushWrapper)


def _stdout_failed(code: int | None, reason: str | None = None) -> NoReturn:
    """A write to standard output failed: its one line, exit 1, nothing unfinished left."""
    from htsep import files

    files.remove_unfinished()
    with contextlib.suppress(OSError, ValueError):
        _abandon_stdout()
    if reason is None:
        reason = os.strerror(code) if code is not None else "write failed"
    _error(f"cannot write to standard output: {reason}")
    _exit(1)


def _interrupted(exc: KeyboardInterrupt) -> NoReturn:
    from htsep import files

    files.remove_unfinished()
    early_interrupted_records(sys.argv[1:])
    _error(how_stopped(exc))
    _exit(exit_status(exc))


def _abandon_stdout() -> None:
    """Point standard output at /dev/null after a failed write: the bytes Python still holds
    for it must not be tried again at exit (Python's own complaint, a second line)."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)


def _writing_stdout(exc: BaseException) -> bool:
    """Whether ``exc`` came from a write to standard output: a frame of its traceback holds
    sys.stdout or its buffer (click's echo, tqdm's write)."""
    streams = [sys.stdout, getattr(sys.stdout, "buffer", None)]
    traceback = exc.__traceback__
    while traceback is not None:
        values = traceback.tb_frame.f_locals.values()
        if sys.stdout is not None and any(v is s for v in values for s in streams):
            return True
        traceback = traceback.tb_next
    return False


def _exit(code: int | str | None) -> NoReturn:
    """End the process with ``code`` (as ``sys.exit`` takes it), skipping the interpreter's
    teardown once torch is loaded: freeing its modules and tensors one by one took 0.3-0.4 s
    of every run. What an exit must still do is done first: atexit handlers (logging,
    temporary folders), then stdout and stderr are flushed; a failed flush (a closed pipe)
    makes the status 1 as Python's own exit would. Where threads of ours still run, or torch
    was never imported (--help), Python exits the usual way."""
    # The work is done and reported: a signal now would only interrupt the exit itself
    # (torch's atexit handlers, a traceback of theirs).
    if threading.current_thread() is threading.main_thread():
        for sig in _STOPPING:
            signal.signal(sig, signal.SIG_IGN)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if "torch" not in sys.modules or any(not t.daemon for t in others):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the descriptor was closed when Python started
                stream.flush()
        except (OSError, ValueError):
            status = status or 1
    os._exit(status)


if __name__ == "__main__":
    main()
