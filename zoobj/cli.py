"""The ``zoobj`` command line: parses flags and calls library code, nothing more."""

from __future__ import annotations

import typer

import zoobj

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune language models toward any metric with forward passes only (MeZO).",
)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"zoobj {zoobj.__version__}")
        raise typer.Exit()


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    typer.echo(f"zoobj {zoobj.__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
