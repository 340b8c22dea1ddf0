"""The command line: a thin Typer layer that parses, calls the library and reports."""

from __future__ import annotations

import typer

from htsep import __version__

app = typer.Typer(
    name="htsep",
    help="Music stem separation with Hybrid Transformer Demucs.",
    no_args_is_help=True,
    add_completion=False,
)


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
) -> None:
    """Separate music into stems (drums, bass, other, vocals, ...)."""


@app.command("info")
def info(checkpoint: str = typer.Argument(..., help="Path to a checkpoint file.")) -> None:
    """Load a checkpoint and print what it contains."""
    from htsep.checkpoint import load_model
    from htsep.errors import HtsepError

    try:
        model = load_model(checkpoint)
    except HtsepError as exc:
        typer.echo(f"htsep: error: {exc}", err=True)
        raise typer.Exit(1) from None
    params = sum(p.numel() for p in model.parameters())
    typer.echo(f"sources: {', '.join(model.sources)}")
    typer.echo(f"sample rate: {model.sample_rate} Hz, channels: {model.audio_channels}")
    typer.echo(f"segment: {model.segment} s ({model.segment_length} samples)")
    typer.echo(f"parameters: {params:,}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
