"""`mtpquant publish RUN_DIR --repo ID`; the work is in mtpquant.report.publish."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from mtpquant.cli.app import bars, json_option, llama_cpp_option, quiet_option, toolchain
from mtpquant.report import publish as pub

SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)b?\s*$", re.IGNORECASE)
UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


class SizeType(click.ParamType):
    """Bytes, or a number with K/M/G/T (powers of 1000, as the Hub and llama-gguf-split count)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = SIZE_RE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a size (e.g. 50G, 1500M, or bytes)", param, ctx)
        return int(m[1]) * UNITS[m[2].lower()]


@click.command("publish")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=Path))
@click.option("--repo", required=True, metavar="OWNER/NAME", help="The Hugging Face model repo (created if needed).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--dry-run", is_flag=True, help="Print what would be uploaded and where; upload and create nothing.")
@click.option("--split-max-size", type=SizeType(), default="50G", show_default=True,
              help="Artifacts larger than this are split with llama-gguf-split (the Hub's per-file limit is 50 GB).")
@llama_cpp_option
@json_option
@quiet_option
def publish(run_dir: Path, repo: str, private: bool, dry_run: bool, split_max_size: int, llama_cpp: Path | None,
            as_json: bool, quiet: bool) -> None:
    """Verify a run directory, then upload its artifacts, card, receipts and SHA256SUMS to a Hugging Face repo.

    The token comes from HF_TOKEN or the saved login (`hf auth login`); the hub from HF_ENDPOINT. A re-run sends
    only what the repo lacks, so an interrupted upload resumes by running the command again.
    """

    ctx = click.get_current_context()
    ctx.meta["mtpquant.interrupted"] = (f"interrupted; no commit was made. {pub.RESUME_HINT[0].upper()}"
                                        f"{pub.RESUME_HINT[1:]}")
    tc = toolchain(llama_cpp) if llama_cpp is not None else None
    with bars(quiet or as_json) as progress:
        report = pub.publish_run(run_dir, repo, private=private, dry_run=dry_run, progress=progress,
                                 split_max_size=split_max_size, toolchain=tc)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    click.echo("\n".join(report_lines(report)))


def report_lines(report) -> list[str]:
    """The report as text: one line per file (action, repo path, size, sha256, local file), then a summary."""
    lines = []
    if report.dry_run:
        lines.append("dry run: nothing is uploaded and nothing is created")
        state = "exists" if report.repo_existed else "would be created" + (" (private)" if report.private else "")
        lines.append(f"repo {report.repo} on {report.endpoint}: {state}")
    width = max(len(f.path) for f in report.files)
    for f in report.files:
        action = {"upload": "would upload" if report.dry_run else "uploaded", "unchanged": "unchanged",
                  "make": "would make"}[f.action]
        if f.local is not None:
            local = f.local.relative_to(report.root).as_posix() if f.local.is_relative_to(report.root) else f.local
            tail = f"{f.size:>14,} B  sha256 {f.sha256}" + (f"  from {local}" if str(local) != f.path else "")
        elif f.kind == "shard":
            tail = f"{'':>14}    (split from {f.part_of}: size and sha256 known once it is split)"
        else:
            tail = f"{'':>14}    (written by a real run before the upload: size and sha256 known then)"
        lines.append(f"  {action:<12} {f.path:<{width}}  {tail}")
    sent = report.uploaded
    size = sum(f.size or 0 for f in sent)
    for artifact, shards in report.shards.items():
        folder = shards[0].rsplit("/", 1)[0]
        lines.append(f"{artifact} is over the per-file limit: {len(shards)} shard(s) under {folder}/")
    lines += [f"note: {n}" for n in report.notes]
    if report.dry_run:
        lines.append(f"{len(sent)} file(s) ({size:,} bytes known) would be uploaded to {report.url}, "
                     f"{len(report.unchanged)} are there unchanged")
    else:
        lines.append(f"published {report.url} at commit {report.commit}: {len(sent)} file(s) uploaded "
                     f"({size:,} bytes), {len(report.unchanged)} unchanged; {report.checked} file(s) match their "
                     "sha256 on the hub")
    return lines
