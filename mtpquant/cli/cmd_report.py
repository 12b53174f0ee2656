"""`mtpquant card RUN_DIR` and `mtpquant verify RUN_DIR`; the work is in mtpquant.report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mtpquant.cli.app import bars, json_option, llama_cpp_option, quiet_option, toolchain
from mtpquant.core.rundir import RunDir
from mtpquant.recipe import load as load_recipe
from mtpquant.report import audit
from mtpquant.report import card as cardmod

run_dir_argument = click.argument("run_dir", metavar="RUN_DIR",
                                  type=click.Path(path_type=Path, file_okay=False, exists=True))


@click.command("card")
@run_dir_argument
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Take the card settings from this recipe (default: the one manifest.json names, if unchanged).")
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the card instead of writing README.md.")
def card(run_dir: Path, recipe_path: Path | None, to_stdout: bool) -> None:
    """Render the model card (README.md) of a run directory from its receipts."""
    run = RunDir(run_dir.resolve())
    recipe = load_recipe(recipe_path) if recipe_path else None
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
@click.option("--allow-failed-gates", is_flag=True,
              help="Report a failed smoke gate as a note instead of failing (publish never allows it).")
@llama_cpp_option
@json_option
@quiet_option
def verify(run_dir: Path, rebuild: bool, source: Path | None, allow_failed_gates: bool, llama_cpp: Path | None,
           as_json: bool, quiet: bool) -> None:
    """Check a run directory: artifact sha256s, headers, measurements and the card, all against the receipts."""
    tc = toolchain(llama_cpp) if rebuild else None
    with bars(quiet or as_json) as progress:
        report = audit.verify_run(run_dir, rebuild=rebuild, toolchain=tc, source=source, progress=progress,
                                  allow_failed_gates=allow_failed_gates)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    lines = [f"ok  {line}" for line in report.checks] + [f"--  {line}" for line in report.notes]
    lines.append(f"verified {report.root}")
    click.echo("\n".join(lines))
