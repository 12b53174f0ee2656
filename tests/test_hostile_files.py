"""Broken files and a broken machine: paths that are not regular files (folders, FIFOs, devices), text that is not
UTF-8, an `--out` that is a file, a read-only or full disk, and a tool that exits 0 after writing half its output.
Each gives one line naming the path, a non-zero exit, nothing half-written and no process left; and the README's
own recipe example works as the README says."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtpquant import recipe as rcp
from mtpquant.cli import main
from mtpquant.core.errors import UsageError
from mtpquant.core.rundir import RunDir
from mtpquant.measure.smoke import load_suite
from mtpquant.pipeline import build as pipeline

REPO = Path(__file__).resolve().parents[1]
RECIPE = "name: small\nsource: {synthetic: {arch: qwen35moe, seed: 3}}\nvariants: [{type: Q8_0}]\n"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-server", "llama-gguf-split")


def _alarm(signum, frame):
    raise TimeoutError("the command hung")


def cli(args: list[str], env: dict | None = None, seconds: float = 120):
    """The CLI in this process, with a watchdog: opening a FIFO would block, and must not happen."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        res = CliRunner().invoke(main, args, env=env)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not isinstance(res.exception, TimeoutError), f"{args}: hung"
    return res


def assert_one_line(res, code: int, line: str) -> None:
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert (res.exit_code, res.stderr) == (code, line + "\n")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under a folder with its size and mtime: what a failed command must leave as it was."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*incomplete*"))


def tools_running() -> list[int]:
    """llama.cpp processes of this test session (see conftest)."""
    tag = f"MTPQUANT_TEST_SESSION={os.environ['MTPQUANT_TEST_SESSION']}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() in {t[:15] for t in TOOLS} \
                    and tag in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, toolchain) -> RunDir:
    folder = tmp_path_factory.mktemp("small")
    (folder / "recipe.yaml").write_text(RECIPE)
    pipeline.build(rcp.load(folder / "recipe.yaml"), folder / "out", toolchain)
    return RunDir((folder / "out").resolve())


def copy_run(run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(run.root, dest)
    return RunDir(dest)


# ----------------------------------------------------------------------------------------------- not regular files

def _special(tmp_path: Path, kind: str, name: str) -> Path:
    if kind == "device":
        return Path("/dev/zero")
    p = tmp_path / name
    if kind == "folder":
        p.mkdir()
    else:
        os.mkfifo(p)
    return p


def _unreadable_text(tmp_path: Path, kind: str, name: str, latin: bytes) -> tuple[Path, str]:
    """A path of `kind` that cannot be read as UTF-8 text ("not UTF-8": a file holding `latin`, whose one non-ASCII
    byte is the bad one), and the words the refusal puts after the path."""
    if kind == "not UTF-8":
        p = tmp_path / name
        p.write_bytes(latin)
        return p, f": not UTF-8 (byte {next(i for i, b in enumerate(latin) if b > 0x7F)})"
    what = {"folder": "a directory", "FIFO": "a FIFO (named pipe)", "device": "a character device"}[kind]
    return _special(tmp_path, kind, name), f" is {what}, not a regular file"


@pytest.mark.parametrize("kind", ["folder", "FIFO", "device"])
def test_inspect_refuses_what_is_not_a_file(tmp_path, kind):
    p = _special(tmp_path, kind, "model.gguf")
    assert_one_line(cli(["inspect", str(p)]), 2, f"error: {p}: not a regular file (give a .gguf file)")


def test_recipe_that_is_a_fifo(tmp_path):
    p = _special(tmp_path, "FIFO", "recipe.yaml")
    res = cli(["build", str(p), "--out", str(tmp_path / "out")])
    assert_one_line(res, 2, f"error: {p}: not a regular file (give the path of a .yaml recipe, e.g. "
                            "recipes/demo-tiny.yaml)")
    assert not (tmp_path / "out").exists()


def test_recipe_naming_a_fifo_corpus_and_a_folder_source(tmp_path):
    corpus = _special(tmp_path, "FIFO", "corpus.txt")
    source = _special(tmp_path, "folder", "model.gguf")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsource: {path: model.gguf}\nvariants: [{type: Q4_K_M}]\n"
                      "imatrix: {compute: {corpus: corpus.txt}}\n")
    res = cli(["build", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert res.stderr == (f"{recipe}: source.path: {source} is a directory, not a regular file (give a file)\n"
                          f"{recipe}: imatrix.compute.corpus: {corpus} is a FIFO (named pipe), not a regular file "
                          "(give a file)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["folder", "FIFO", "device", "not UTF-8"])
def test_eval_text_that_cannot_be_read_as_text(small_run, tmp_path, kind):
    p, why = _unreadable_text(tmp_path, kind, "text.txt", "Größe und Gewicht\n".encode("latin-1"))
    run = copy_run(small_run, tmp_path / "run")
    before = snapshot(run.root)
    res = cli(["eval", str(run.root), "--text", str(p)])
    assert_one_line(res, 2, f"error: {p}{why} (give a UTF-8 text file)")
    assert snapshot(run.root) == before and not tools_running()


@pytest.mark.parametrize("kind", ["folder", "FIFO", "device", "not UTF-8"])
def test_prompt_suite_that_cannot_be_read_as_text(tmp_path, kind):
    p, why = _unreadable_text(tmp_path, kind, "suite.jsonl", b'{"id": "a", "category": "code", "prompt": "\xe9"}\n')
    with pytest.raises(UsageError) as ei:
        load_suite(p)
    assert ei.value.one_line() == f"{p}{why} (give a JSONL prompt suite saved as UTF-8)"


# ----------------------------------------------------------------------------------------------- the machine

def test_out_that_is_a_file(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "taken"
    out.write_text("someone's notes\n")
    res = cli(["build", str(tmp_path / "r.yaml"), "--out", str(out)])
    assert_one_line(res, 2, f"error: {out} is a file, not a run directory (give --out a folder (new or a run's))")
    assert out.read_text() == "someone's notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "taken"]


@contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    """A small tmpfs mounted at `where` (read-only after `prepare`), or a skip when mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                         text=True, check=False)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({got.stderr.strip() or got.returncode}): needs root in a "
                    "namespace that permits mounts")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount_ro(where: Path) -> None:
    got = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True, check=False)
    if got.returncode != 0:
        pytest.skip(f"cannot remount a tmpfs read-only here ({got.stderr.strip()})")


def test_out_on_a_read_only_disk(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    with tmpfs(tmp_path / "ro", "4m") as ro:
        (ro / "existing").mkdir()
        remount_ro(ro)
        res = cli(["build", str(tmp_path / "r.yaml"), "--out", str(ro / "new")])
        assert_one_line(res, 1, f"error: {ro / 'new'}: Read-only file system (choose a writable --out)")
        res = cli(["build", str(tmp_path / "r.yaml"), "--out", str(ro / "existing")])
        assert_one_line(res, 1, f"error: {ro / 'existing' / 'receipts'}: Read-only file system (choose a writable "
                                "--out)")
        assert snapshot(ro) == {}


def test_card_on_a_read_only_run(small_run, tmp_path):
    with tmpfs(tmp_path / "ro", "16m") as ro:
        run = copy_run(small_run, ro / "run")
        (run.root / "README.md").unlink()
        before = snapshot(run.root)
        remount_ro(ro)
        res = cli(["card", str(run.root)])
        assert res.exit_code == 1 and res.stderr.count("\n") == 1
        assert re.fullmatch(rf"error: {re.escape(str(run.root))}/\S+: Read-only file system \(choose a writable "
                            r"--out\)\n", res.stderr), res.stderr
        assert snapshot(run.root) == before


def _fill(folder: Path) -> None:
    st = os.statvfs(folder)
    (folder / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize))


def test_card_on_a_full_disk(small_run, tmp_path):
    with tmpfs(tmp_path / "full", "16m") as full:
        run = copy_run(small_run, full / "run")
        before = snapshot(run.root)
        _fill(full)
        res = cli(["card", str(run.root)])
        assert_one_line(res, 1, f"error: {run.root / 'README.md'}: No space left on device (free some space and "
                                "run again)")
        assert snapshot(run.root) == before and leftovers(run.root) == []


def _fake_toolchain(toolchain, folder: Path, before_real: str, after_real: str = "") -> Path:
    """The real binaries, with a llama-quantize that does something around the real one (dry runs and --help go
    straight to it): a fake only to show what a real tool cannot be made to do on cue."""
    folder.mkdir()
    for name in TOOLS:
        if name != "llama-quantize":  # never a link here: writing the script through it would replace the real one
            (folder / name).symlink_to(toolchain.tool(name))
    real = toolchain.tool("llama-quantize")
    script = folder / "llama-quantize"
    assert not script.exists() and not script.is_symlink()  # a new file, never one written through a link
    script.write_text(f"""#!/bin/bash
for a in "$@"; do
  if [ "$a" = --dry-run ] || [ "$a" = --help ]; then exec {real} "$@"; fi
done
out="${{@: -3:1}}"
{before_real}
{real} "$@" || exit $?
{after_real}
""")
    script.chmod(0o755)
    return folder


def test_tool_that_exits_0_with_a_truncated_output(toolchain, tmp_path):
    """llama-quantize 'succeeds' but leaves half a file: caught before the file takes its final name; the next run
    with the real tool builds it and leaves no temporary file."""
    bin_dir = _fake_toolchain(toolchain, tmp_path / "bin", "",
                              'truncate -s $(( $(stat -c %s "$out") / 2 )) "$out"')
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    res = cli(["build", str(tmp_path / "r.yaml"), "--out", str(out), "--llama-cpp", str(bin_dir), "-q"])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    m = re.fullmatch(r"error: \.small-Q8_0\.gguf\.\d+\.incomplete: not a whole GGUF: truncated or corrupt GGUF "
                     r"\(tensor (\S+) ends at byte (\d+), file has (\d+)\) \(it was not kept; the tool exited 0 "
                     r"without finishing it, see its log\)\n", res.stderr)
    assert m, res.stderr
    assert not (out / "small-Q8_0.gguf").exists() and leftovers(out) == []
    assert not (out / "receipts" / "quantize-Q8_0.json").exists() and not (out / "SHA256SUMS").exists()
    res = cli(["build", str(tmp_path / "r.yaml"), "--out", str(out), "-q"], env={"MTPQUANT_LLAMA_CPP":
                                                                                  str(toolchain.bin_dir)})
    assert res.exit_code == 0, res.output
    assert (out / "small-Q8_0.gguf").is_file() and leftovers(out) == []
    assert not tools_running()


def test_disk_filling_up_while_a_tool_runs(toolchain, tmp_path):
    """Another process fills the disk just as llama-quantize starts: the log cannot be written, and that is the one
    line, naming the log; no partial output and no tool left."""
    (tmp_path / "r.yaml").write_text(RECIPE)
    with tmpfs(tmp_path / "disk", "96m") as disk:
        bin_dir = _fake_toolchain(toolchain, tmp_path / "bin", f"head -c 1000000000 /dev/zero > {disk}/filler")
        out = disk / "out"
        res = cli(["build", str(tmp_path / "r.yaml"), "--out", str(out), "--llama-cpp", str(bin_dir), "-q"])
        assert_one_line(res, 1, f"error: {out / 'logs' / 'quantize-Q8_0.log'}: No space left on device (free some "
                                "space and run again)")
        assert not (out / "small-Q8_0.gguf").exists() and leftovers(out) == []
        assert not tools_running()


# ----------------------------------------------------------------------------------------------- README

def readme_recipe() -> str:
    """The YAML example of the README's Recipes section, as it is printed there."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Recipes\n", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)


def _readme_layout(tmp_path: Path, text: str) -> Path:
    """The example where the README puts it: a recipes/ folder beside imatrix/ (its corpus path is relative)."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "imatrix").mkdir()
    shutil.copyfile(REPO / "imatrix" / "codemath-chat-v1.txt", tmp_path / "imatrix" / "codemath-chat-v1.txt")
    path = tmp_path / "recipes" / "readme.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_readme_example_plans_as_the_readme_says(tmp_path, llama_env):
    """'variant rules come before the recipe's': the IQ3_XXS variant's NextN rule takes the whole draft block,
    eh_proj included, and the recipe's eh_proj rule, overridden there, is no error; Q4_K_M keeps eh_proj at Q8_0."""
    text = readme_recipe()
    assert "{type: IQ3_XXS, policy: [{block: nextn, type: Q6_K}]}   # variant rules come before the recipe's" in text
    path = _readme_layout(tmp_path, text)
    res = cli(["plan", str(path), "--json", "-q"], env={"MTPQUANT_LLAMA_CPP": llama_env["MTPQUANT_LLAMA_CPP"]})
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    types = {v["variant"]: {t["name"]: (t["type"], t["rule"]) for t in v["tensors"]} for v in plan["variants"]}
    assert types["Q4_K_M"]["blk.2.nextn.eh_proj.weight"] == ("Q8_0", "policy[0]")
    nextn = {n: ty for n, ty in types["IQ3_XXS"].items() if n.startswith("blk.2.") and ty[1]}
    assert nextn["blk.2.nextn.eh_proj.weight"] == ("Q6_K", "variants[1].policy[0]")
    assert set(nextn.values()) == {("Q6_K", "variants[1].policy[0]")}


def test_readme_example_builds(tmp_path, toolchain):
    """The same example built, with one imatrix chunk and Q3_K_M for IQ3_XXS (which takes llama-quantize 20 s here;
    the rules are the README's): every NextN tensor that variant quantizes is Q6_K in the file, eh_proj is Q8_0 in
    Q4_K_M, and both verify."""
    text = readme_recipe().replace("chunks: 24", "chunks: 1").replace("{type: IQ3_XXS,", "{type: Q3_K_M,")
    path = _readme_layout(tmp_path, text)
    pipeline.build(rcp.load(path), tmp_path / "out", toolchain)
    run = RunDir((tmp_path / "out").resolve())
    q4 = json.loads((run.receipts / "quantize-Q4_K_M.json").read_text())
    q3 = json.loads((run.receipts / "quantize-Q3_K_M.json").read_text())
    assert q4["nextn_types"]["blk.2.nextn.eh_proj.weight"] == "Q8_0"
    assert {t for t in q3["nextn_types"].values() if t != "F32"} == {"Q6_K"}
    res = cli(["verify", str(run.root), "-q"])
    assert res.exit_code == 0, res.output


def test_a_recipe_rule_shadowed_by_an_earlier_recipe_rule_is_still_an_error(tmp_path, llama_env):
    """Only a variant's own rules may override a recipe rule silently: two recipe rules where the first takes all
    the second matches is a mistake in the recipe."""
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("variants:", "policy:\n  - {block: nextn, type: Q6_K}\n"
                                                "  - {match: 'nextn\\.eh_proj\\.weight$', type: Q8_0}\nvariants:"))
    res = cli(["plan", str(path), "-q"], env={"MTPQUANT_LLAMA_CPP": llama_env["MTPQUANT_LLAMA_CPP"]})
    assert_one_line(res, 1, "error: variant Q8_0: policy[1] (match='nextn\\\\.eh_proj\\\\.weight$' -> Q8_0): matches "
                            "only tensors llama-quantize never quantizes (norms, router gates, ...) or tensors an "
                            "earlier rule already took (fix the rule's regex or block; `mtpquant inspect SOURCE` "
                            "lists the tensor names)")
