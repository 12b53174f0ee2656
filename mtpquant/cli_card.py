"""`mtpquant card RUN_DIR` and `mtpquant verify RUN_DIR`; the work is in mtpquant.card and mtpquant.audit."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from mtpquant.errors import MtpquantError

run_dir_argument = click.argument("run_dir", metavar="RUN_DIR",
                                  type=click.Path(path_type=Path, file_okay=False, exists=True))


@contextlib.contextmanager
def _errors_as_exit():
    """Typed errors become one line on stderr and their exit code; anything else stays a bug with a traceback."""
    ctx = click.get_current_context()
    try:
        yield
    except MtpquantError as exc:
        click.echo(f"error: {exc.one_line()}", err=True)
        ctx.exit(exc.exit_code)


@click.command("card")
@run_dir_argument
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Take the card settings from this recipe (default: the one manifest.json names, if unchanged).")
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the card instead of writing README.md.")
def card(run_dir: Path, recipe_path: Path | None, to_stdout: bool) -> None:
    """Render the model card (README.md) of a run directory from its receipts."""
    from mtpquant import card as cardmod
    from mtpquant import recipe as rcp
    from mtpquant.receipts import RunDir

    with _errors_as_exit():
        run = RunDir(run_dir.resolve())
        recipe = rcp.load(recipe_path) if recipe_path else None
        if to_stdout:
            inputs = cardmod.card_inputs(run, recipe) if recipe else None
            click.echo(cardmod.render_card(run, inputs), nl=False)
            return
        path = cardmod.write_card(run, recipe)
        click.echo(f"wrote {path}")


@click.command("verify")
@run_dir_argument
@click.option("--rebuild", is_flag=True, help="Quantize every variant again and compare bytes (needs the source).")
@click.option("--source", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The BF16 source GGUF for --rebuild, if it is not where the receipts say.")
@click.option("--llama-cpp", "llama_cpp", type=click.Path(path_type=Path), default=None,
              help="Folder with llama.cpp binaries for --rebuild (else $MTPQUANT_LLAMA_CPP, the cache, PATH).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def verify(run_dir: Path, rebuild: bool, source: Path | None, llama_cpp: Path | None, as_json: bool,
           quiet: bool) -> None:
    """Check a run directory: artifact sha256s, headers, measurements and the card, all against the receipts."""
    from mtpquant import audit

    with _errors_as_exit():
        tc = None
        if rebuild:
            from mtpquant.toolchain import locate

            tc = locate(llama_cpp)
        bars = _bars(not quiet and not as_json)
        try:
            report = audit.verify_run(run_dir, rebuild=rebuild, toolchain=tc, source=source, progress=bars)
        finally:
            if bars is not None:
                bars.close()
        if as_json:
            click.echo(json.dumps(report.to_json(), indent=2))
            return
        lines = [f"ok  {line}" for line in report.checks] + [f"--  {line}" for line in report.notes]
        lines.append(f"verified {report.root}")
        click.echo("\n".join(lines))


def _bars(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from mtpquant.cli import Bars

    return Bars(True)
