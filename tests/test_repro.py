"""Reproducible bytes: the demo recipe built from two copies at different paths gives the same artifacts and imatrix,
and neither the files nor the receipts say where the copies lay."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mtpquant import recipe as rcp
from mtpquant.cli import main
from mtpquant.core.files import sha256_file
from mtpquant.modelfile.model import read_model
from mtpquant.pipeline import build as pipeline

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo-tiny.yaml"
CORPUS = REPO / "imatrix" / "codemath-chat-v1.txt"
# Receipt fields that say where the building machine kept a file, by design: the source's location (where verify
# --rebuild and eval look for it) and the hash cache (stat keys, reused only on that machine).
MACHINE_LOCAL = {("source.json", "location"), ("source.json", "hash_cache")}


def checkout_copy(root: Path) -> Path:
    """The demo recipe and its corpus laid out as in the checkout (recipes/, imatrix/) under `root`; smoke and eval
    left out: they measure the artifacts and make none."""
    data = yaml.safe_load(RECIPE.read_text())
    for measured in ("smoke", "eval"):
        data.pop(measured, None)
    (root / "recipes").mkdir(parents=True)
    (root / "imatrix").mkdir()
    shutil.copyfile(CORPUS, root / "imatrix" / CORPUS.name)
    path = root / "recipes" / RECIPE.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def inspect_json(path: Path) -> dict:
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def strings(value, where: str = ""):
    """(field path, string) for every string in a JSON value, keys included."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield where, k
            yield from strings(v, f"{where}.{k}" if where else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from strings(v, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


@pytest.mark.slow
def test_two_checkouts_at_different_paths_give_identical_bytes(tmp_path, toolchain):
    a = checkout_copy(tmp_path / "a")
    b = checkout_copy(tmp_path / "deeper" / "elsewhere" / "other-name")
    runs = [tmp_path / "a" / "out", tmp_path / "deeper" / "runs" / "demo"]
    for recipe, out in zip((a, b), runs):
        pipeline.build(rcp.load(recipe), out, toolchain)
    sums = [(out / "SHA256SUMS").read_text() for out in runs]
    assert sums[0] == sums[1]
    listed = [line.split("  ", 1)[1] for line in sums[0].splitlines()]
    assert sorted(listed) == ["demo-tiny-mtp-IQ3_XXS.gguf", "demo-tiny-mtp-IQ4_XS.gguf", "demo-tiny-mtp-Q4_K_M.gguf",
                              "demo-tiny-mtp.imatrix.gguf"]
    for name in listed:
        assert sha256_file(runs[0] / name) == sha256_file(runs[1] / name), name

    # what the files say of their inputs: names, never folders
    roots = [str(tmp_path / "a"), str(tmp_path / "deeper")]
    for out in runs:
        assert inspect_json(out / "demo-tiny-mtp.imatrix.gguf")["datasets"] == [CORPUS.name]
        for name in listed[:-1]:
            assert inspect_json(out / name)["quantize_imatrix"]["file"] == "demo-tiny-mtp.imatrix.gguf"
            assert inspect_json(out / name)["quantize_imatrix"]["dataset"] == CORPUS.name
            for key, value in read_model(out / name).kv.items():
                if key.startswith(("general.", "quantize.")) and isinstance(value, str):
                    assert "/" not in value, (name, key, value)

    # nor do the receipts, which are published with them
    for out in runs:
        for path in sorted((out / "receipts").glob("*.json")):
            for field, text in strings(json.loads(path.read_text())):
                if (path.name, field.split(".")[0].split("[")[0]) in MACHINE_LOCAL:
                    continue
                assert not any(root in text for root in roots), (path.name, field, text)
        quantize = json.loads((out / "receipts" / "quantize-Q4_K_M.json").read_text())
        assert quantize["cwd"] == "." and quantize["command"][-4] == "demo-tiny-mtp-BF16.gguf"
