"""The `kiln` command: one Typer app, one sub-command per stage."""

import sys

import click
import typer

from kiln.cli import console
from kiln.cli.bench import bench_app
from kiln.cli.build import build_command
from kiln.cli.console import print_error, setup_logging
from kiln.cli.convert import convert_command
from kiln.cli.eval import eval_command
from kiln.cli.inspect import inspect_command
from kiln.cli.quantize import quantize_command
from kiln.cli.run import run_command
from kiln.cli.serve import serve_command
from kiln.core.errors import KilnError
from kiln.core.version import __version__

app = typer.Typer(
    name="kiln",
    help="Kiln: convert, quantize, build, run, serve and benchmark LLMs on NVIDIA GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("convert")(convert_command)
app.command("eval")(eval_command)
app.command("quantize")(quantize_command)
app.command("build")(build_command)
app.command("inspect")(inspect_command)
app.command("run")(run_command)
app.command("serve")(serve_command)
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kiln {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    setup_logging(verbose)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one red line and an exit code, never a traceback."""
    console.INVOCATION[:] = ["kiln", *(sys.argv[1:] if argv is None else argv)]  # reports record it
    try:
        result = app(args=argv, standalone_mode=False, prog_name="kiln")
    except KilnError as exc:
        print_error(str(exc))
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors: unknown flag, bad value
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        print_error("interrupted")
        return 130
    return result if isinstance(result, int) else 0


def entry_point() -> None:
    """Console-script wrapper (`kiln = kiln.cli.main:entry_point`)."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
