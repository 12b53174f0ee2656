"""Command line: each command turns its arguments into one library call; errors become one line and an exit code
(see app.Group)."""

import click

from mtpquant import __version__
from mtpquant.cli import cmd_build, cmd_measure, cmd_models, cmd_publish, cmd_report, cmd_smoke, cmd_toolchain
from mtpquant.cli.app import Group


@click.group(cls=Group)
@click.version_option(__version__, prog_name="mtpquant")
def main() -> None:
    """Quantize MTP/NextN models to GGUF with llama.cpp, keeping and proving the draft head."""


for command in (cmd_toolchain.group, cmd_models.synth_cmd, cmd_models.inspect_cmd, cmd_build.plan_cmd,
                cmd_build.build_cmd, cmd_smoke.smoke, cmd_report.card, cmd_report.verify, cmd_publish.publish,
                cmd_measure.fit, cmd_measure.eval_):
    main.add_command(command)
