"""`mtpquant verify`: passes on a fresh run, names the file and value after any change, and `--rebuild` gives the
same bytes with the same toolchain."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import flip_byte

from mtpquant.cli import main
from mtpquant.core.errors import VerifyError
from mtpquant.core.receipts import PublishReceipt
from mtpquant.core.rundir import RunDir
from mtpquant.report import card as cardmod
from mtpquant.report.audit import verify_run

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from demo_run import build_run, measure


@pytest.fixture(scope="module")
def run(tmp_path_factory, toolchain) -> RunDir:
    """One build with fit, eval and a small smoke run on Q4_K_M, and its card."""
    recipe, r = build_run(tmp_path_factory.mktemp("audit"), toolchain)
    measure(r, recipe, toolchain)
    return r


@pytest.fixture
def copy(run, tmp_path) -> RunDir:
    shutil.copytree(run.root, tmp_path / "run")
    return RunDir(tmp_path / "run")


def receipt(run: RunDir, name: str) -> dict:
    return json.loads((run.receipts / name).read_text())


def put_receipt(run: RunDir, name: str, data: dict) -> None:
    (run.receipts / name).write_text(json.dumps(data, indent=2))


def verify_error(run: RunDir, **kwargs) -> str:
    with pytest.raises(VerifyError) as ei:
        verify_run(run.root, **kwargs)
    return ei.value.message


def test_verify_passes_on_a_fresh_run(run):
    report = verify_run(run.root)
    sums = run.read_sha256sums()
    assert report.artifacts == sums and len(sums) == 3  # two variants and the imatrix
    assert report.checks[0] == "3 file(s) match SHA256SUMS"
    assert "smoke Q4_K_M: measured this artifact; every figure re-derives from its" in "\n".join(report.checks)
    assert "fit Q8_0: the estimate re-derives from the artifact's header" in report.checks
    assert report.checks[-1].startswith("README.md: identical to a fresh rendering from")


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_one_changed_byte_names_the_file(copy, where):
    name = receipt(copy, "quantize-Q8_0.json")["file"]
    path = copy.root / name
    size = path.stat().st_size
    flip_byte(path, {"start": 8, "middle": size // 2, "end": size - 1}[where])
    message = verify_error(copy)
    want = copy.read_sha256sums()[name]
    assert message.startswith(f"{name}: sha256 is ") and message.endswith(f", SHA256SUMS says {want}")


def test_changed_imatrix_names_the_file(copy):
    name = receipt(copy, "imatrix.json")["file"]
    flip_byte(copy.root / name, 100)
    assert verify_error(copy).startswith(f"{name}: sha256 is ")


def test_cli_verify(copy):
    res = CliRunner().invoke(main, ["verify", str(copy.root), "-q"])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "ok  3 file(s) match SHA256SUMS" and lines[-1] == f"verified {copy.root.resolve()}"
    res = CliRunner().invoke(main, ["verify", str(copy.root), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] is True
    name = receipt(copy, "quantize-Q4_K_M.json")["file"]
    flip_byte(copy.root / name, 1000)
    res = CliRunner().invoke(main, ["verify", str(copy.root)])
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.startswith(f"error: {name}: sha256 is ") and res.stderr.count("\n") == 1


def test_edited_card_names_line_and_value(copy):
    q = receipt(copy, "quantize-Q4_K_M.json")
    readme = copy.root / "README.md"
    text = readme.read_text()
    shown = f"| {q['bits_per_weight']:.2f} |"
    lines = text.splitlines()
    line_no = next(i for i, ln in enumerate(lines, 1) if ln.startswith(f"| `{q['file']}`"))
    readme.write_text(text.replace(shown, "| 3.99 |", 1))
    assert verify_error(copy) == (f"README.md line {line_no} (Files): shows '3.99', the receipts give "
                                  f"'{q['bits_per_weight']:.2f}'")


def test_card_naming_another_base_model_fails(copy):
    readme = copy.root / "README.md"
    readme.write_text(readme.read_text().replace("---\nlicense:", "---\nbase_model: Qwen/Qwen3-Next-80B-A3B-Instruct"
                                                                   "\nbase_model_relation: quantized\nlicense:", 1))
    src = receipt(copy, "source.json")
    assert verify_error(copy) == (
        "README.md: base_model is Qwen/Qwen3-Next-80B-A3B-Instruct, receipts/source.json gives no base_model "
        f"(synthetic source, qwen35moe, {src['main_layers']} main + {src['nextn_predict_layers']} NextN layers)")


def test_card_older_than_a_receipt_fails(copy):
    fit = receipt(copy, "fit-Q8_0.json")
    fit["written_at"] = "2030-01-01T00:00:00Z"
    put_receipt(copy, "fit-Q8_0.json", fit)
    assert verify_error(copy).startswith("receipts/fit-Q8_0.json: sha256 is ")
    (copy.receipts / "fit-Q8_0.json").unlink()
    assert verify_error(copy) == "README.md: lists receipts/fit-Q8_0.json, which is missing"


def test_receipt_figure_that_its_runs_do_not_give_fails(copy):
    s = receipt(copy, "smoke-Q4_K_M.json")
    recorded = dict(s["headline"]["acceptance"])
    s["headline"]["acceptance"]["value"] = 0.99
    put_receipt(copy, "smoke-Q4_K_M.json", s)
    cardmod.write_card(copy)  # a card rendered from the edited receipt agrees with it; the runs do not
    assert verify_error(copy) == (f"receipts/smoke-Q4_K_M.json: headline.acceptance is "
                                  f"{json.dumps({**recorded, 'value': 0.99})}, its own runs give "
                                  f"{json.dumps(recorded)}")


def test_stale_measurement_fails(copy):
    s = receipt(copy, "smoke-Q4_K_M.json")
    s["model"]["sha256"] = "0" * 64
    put_receipt(copy, "smoke-Q4_K_M.json", s)
    q = receipt(copy, "quantize-Q4_K_M.json")
    assert verify_error(copy) == (f"receipts/smoke-Q4_K_M.json: measured {q['file']} with sha256 {'0' * 64}, but "
                                  f"{q['file']} is {q['sha256']}")


def test_receipt_that_disagrees_with_the_header_fails(copy):
    q = receipt(copy, "quantize-Q8_0.json")
    eh = next(n for n in q["nextn_types"] if n.endswith("nextn.eh_proj.weight"))
    q["nextn_types"][eh] = "Q4_K"
    put_receipt(copy, "quantize-Q8_0.json", q)
    assert verify_error(copy) == (f"{q['file']}: header gives nextn_types.{eh} = \"Q8_0\", "
                                  f"receipts/quantize-Q8_0.json says \"Q4_K\"")


def test_missing_card_fails(copy):
    (copy.root / "README.md").unlink()
    assert verify_error(copy) == "README.md: missing"


def test_rebuild_is_bit_exact(copy, toolchain):
    # moved to another folder: relative paths in the recorded command must still give the same bytes
    moved = copy.root.with_name("moved")
    os.replace(copy.root, moved)
    report = verify_run(moved, rebuild=True, toolchain=toolchain)
    assert [(r.variant, r.bit_exact, r.same_toolchain) for r in report.rebuilt] == [
        ("Q4_K_M", True, True), ("Q8_0", True, True)]
    assert [r.sha256 for r in report.rebuilt] == [receipt(RunDir(moved), f"quantize-{t}.json")["sha256"]
                                                  for t in ("Q4_K_M", "Q8_0")]
    assert not list(moved.glob(".verify-rebuild-*"))


def test_rebuild_reports_where_bytes_differ(copy, toolchain):
    q = receipt(copy, "quantize-Q8_0.json")
    q["overrides"] = []  # a different plan than the one that made the file: eh_proj keeps the Q8_0 default anyway,
    q["command"][q["command"].index("Q8_0")] = "Q4_K_M"  # so change the type the command records as well
    q["type"] = "Q4_K_M"
    with pytest.raises(VerifyError) as ei:
        from mtpquant.report.audit import rebuild_run

        rebuild_run(copy, toolchain, receipts={n: receipt(copy, n) for n in ("source.json", "quantize-Q8_0.json")}
                    | {"quantize-Q8_0.json": q})
    assert ei.value.message.startswith(f"rebuild differs: {q['file']}: rebuilt sha256 ")
    assert "first difference byte " in ei.value.message


def test_rebuild_with_a_pinned_imatrix_outside_the_run(run, tmp_path, toolchain):
    """A pinned imatrix is recorded by a `../` path (it is written into the GGUF): rebuild lays it out the same."""
    from demo_run import TEST_RECIPE

    from mtpquant.core.files import sha256_file

    im = receipt(run, "imatrix.json")["file"]
    (tmp_path / "imatrix").mkdir()
    pinned = tmp_path / "imatrix" / "pinned.imatrix.gguf"
    shutil.copy2(run.root / im, pinned)
    text = TEST_RECIPE.replace(TEST_RECIPE[TEST_RECIPE.index("  compute:"):TEST_RECIPE.index("policy:")],
                               f"  file: {{path: imatrix/pinned.imatrix.gguf, sha256: {sha256_file(pinned)}}}\n")
    text = text.replace("  - {type: Q8_0}\n", "")
    _, pin_run = build_run(tmp_path, toolchain, text)
    q = receipt(pin_run, "quantize-Q4_K_M.json")
    assert q["command"][1:3] == ["--imatrix", "../imatrix/pinned.imatrix.gguf"]
    assert "- `pinned.imatrix.gguf`, sha256 " in (pin_run.root / "README.md").read_text()
    report = verify_run(pin_run.root, rebuild=True, toolchain=toolchain)
    assert [(r.variant, r.bit_exact) for r in report.rebuilt] == [("Q4_K_M", True)]


def test_published_copy_with_split_file_verifies_through_its_shards(copy, toolchain):
    """A download of a published run holds a big file only as shards: they are checked against publish.json."""
    from mtpquant.core.files import sha256_file
    from mtpquant.core.procs import run_tool

    q = receipt(copy, "quantize-Q8_0.json")
    big = copy.root / q["file"]
    (copy.root / "split").mkdir()
    run_tool([toolchain.tool("llama-gguf-split"), "--split", "--split-max-size", "2M", big,
              copy.root / "split" / big.stem])
    shards = sorted((copy.root / "split").glob("*.gguf"))
    assert len(shards) >= 2
    entries = {q["file"]: {"kind": "artifact", "size": q["bytes"], "sha256": q["sha256"], "path": None,
                           "shards": [{"path": f"split/{p.name}", "size": p.stat().st_size,
                                       "sha256": sha256_file(p)} for p in shards]}}
    copy.write(PublishReceipt(repo="someone/card-test-GGUF", split_max_size=2 << 20, artifacts=entries, files=[],
                              card="README.md"))
    big.unlink()
    cardmod.write_card(copy)
    text = (copy.root / "README.md").read_text()
    assert "Published as `someone/card-test-GGUF`." in text
    assert f"| `{q['file']}` | `split/{shards[0].name}` |" in text
    report = verify_run(copy.root)
    assert f"{len(shards)} shard(s) of 1 split file(s) match receipts/publish.json" in report.checks
    flip_byte(shards[-1], 100)
    assert verify_error(copy).startswith(f"split/{shards[-1].name}: sha256 is ")


# ----------------------------------------------------------------------------------------------- manifest.json

MANIFEST_HINT = " (manifest.json and the receipts are not of the same build; rebuild the run (mtpquant build))"


@pytest.fixture
def unmeasured(copy) -> RunDir:
    """A copy without its smoke receipt (the card rendered again): what these tests check is not the smoke's."""
    for p in copy.receipts.glob("smoke-*.json"):
        p.unlink()
    cardmod.write_card(copy)
    return copy


def edit_manifest(run: RunDir, change) -> dict:
    data = json.loads(run.manifest_path.read_text())
    change(data)
    run.manifest_path.write_text(json.dumps(data, indent=2))
    return data


def test_verify_holds_the_manifest_against_the_receipts(unmeasured):
    steps = json.loads(unmeasured.manifest_path.read_text())["steps"]
    assert (f"manifest.json agrees with the receipts ({len(steps)} step(s): name, source, files, sha256s)"
            in verify_run(unmeasured.root).checks)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["steps"]["quantize:Q4_K_M"].update(sha256="0" * 64),
     lambda r: f'manifest.json: steps.quantize:Q4_K_M.sha256 is "{"0" * 64}", receipts/quantize-Q4_K_M.json says '
               f'"{r["quantize-Q4_K_M.json"]["sha256"]}"'),
    (lambda m: m["steps"]["quantize:Q8_0"].update(file="card-test-Q8_0-old.gguf"),
     lambda r: 'manifest.json: steps.quantize:Q8_0.file is "card-test-Q8_0-old.gguf", receipts/quantize-Q8_0.json '
               'says "card-test-Q8_0.gguf"'),
    (lambda m: m["steps"].pop("quantize:Q8_0"),
     lambda r: "manifest.json: steps has no quantize:Q8_0, but receipts/quantize-Q8_0.json is there"),
    (lambda m: m["steps"].update({"quantize:IQ2_XS": {"file": "card-test-IQ2_XS.gguf", "sha256": "1" * 64}}),
     lambda r: "manifest.json: steps.quantize:IQ2_XS has no receipt (receipts/quantize-IQ2_XS.json is missing)"),
    (lambda m: m["steps"]["imatrix"].update(sha256="2" * 64),
     lambda r: f'manifest.json: steps.imatrix.sha256 is "{"2" * 64}", receipts/imatrix.json says '
               f'"{r["imatrix.json"]["sha256"]}"'),
    (lambda m: m["steps"].update(imatrix=None),
     lambda r: "manifest.json: steps.imatrix is null, but the variants were quantized with an imatrix"),
    (lambda m: m["steps"]["fit:Q8_0"].update(receipt="receipts/fit-Q4_K_M.json"),
     lambda r: 'manifest.json: steps.fit:Q8_0.receipt is "receipts/fit-Q4_K_M.json", the step\'s receipt is '
               "receipts/fit-Q8_0.json"),
    (lambda m: m["source"].update(sha256="3" * 64),
     lambda r: f'manifest.json: source.sha256 is "{"3" * 64}", receipts/source.json says '
               f'"{r["source.json"]["sha256"]}"'),
    (lambda m: m.update(name="another-run"),
     lambda r: 'manifest.json: name is "another-run", receipts/card.json says "card-test"'),
    (lambda m: m.pop("steps"), lambda r: "manifest.json: no 'steps' object"),
], ids=["sha256", "file", "variant-missing", "variant-extra", "imatrix", "imatrix-null", "receipt", "source",
        "name", "no-steps"])
def test_a_manifest_that_disagrees_with_the_receipts_is_one_line(unmeasured, change, message):
    receipts = {p.name: json.loads(p.read_text()) for p in unmeasured.receipts.glob("*.json")}
    edit_manifest(unmeasured, change)
    with pytest.raises(VerifyError) as ei:
        verify_run(unmeasured.root)
    assert ei.value.one_line() == message(receipts) + MANIFEST_HINT
    res = CliRunner().invoke(main, ["verify", str(unmeasured.root)])
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", f"error: {message(receipts)}{MANIFEST_HINT}\n")


def test_a_missing_manifest_fails_and_a_removed_measurement_is_a_note(unmeasured):
    (unmeasured.receipts / "fit-Q8_0.json").unlink()
    cardmod.write_card(unmeasured)  # the card no longer lists it; the manifest still does
    assert ("manifest.json: steps.fit:Q8_0 names receipts/fit-Q8_0.json, not in this run (measured at build time, "
            "removed since)") in verify_run(unmeasured.root).notes
    unmeasured.manifest_path.unlink()
    with pytest.raises(VerifyError) as ei:
        verify_run(unmeasured.root)
    assert ei.value.one_line() == "manifest.json: missing (the run is incomplete; rerun `mtpquant build`)"


# ----------------------------------------------------------------------------------------------- links out of the run

def test_a_listed_file_linking_out_of_the_run_is_refused(unmeasured, tmp_path):
    name = receipt(unmeasured, "quantize-Q4_K_M.json")["file"]
    elsewhere = tmp_path / "elsewhere" / name
    elsewhere.parent.mkdir()
    os.replace(unmeasured.root / name, elsewhere)
    (unmeasured.root / name).symlink_to(elsewhere)
    with pytest.raises(VerifyError) as ei:
        verify_run(unmeasured.root)
    assert ei.value.one_line() == (f"{name}: a symbolic link to {elsewhere}, outside the run directory (only files of "
                                   "the run directory may leave the machine: put the file itself there, not a link)")
    # a link that stays inside the run directory is a file of it
    (unmeasured.root / name).unlink()
    (unmeasured.root / "store").mkdir()
    os.replace(elsewhere, unmeasured.root / "store" / name)
    (unmeasured.root / name).symlink_to(Path("store") / name)
    assert verify_run(unmeasured.root).artifacts[name] == receipt(unmeasured, "quantize-Q4_K_M.json")["sha256"]


# ----------------------------------------------------------------------------------------------- rebuild's toolchain

def test_rebuild_names_what_of_the_toolchain_differs_and_that_the_bytes_agree(unmeasured, toolchain):
    here = toolchain.describe()
    q = receipt(unmeasured, "quantize-Q8_0.json")
    recorded = q["toolchain"]
    recorded["llama_cpp_commit"] = "0123456"
    recorded["cmake_flags"] = [f.replace("-DGGML_NATIVE=OFF", "-DGGML_NATIVE=ON") for f in recorded["cmake_flags"]]
    recorded["compiler"] = "clang version 17.0.6"
    recorded["cpu"]["features"] = [*recorded["cpu"]["features"], "avx512f"]
    recorded["binaries"]["llama-quantize"]["sha256"] = "f" * 64
    put_receipt(unmeasured, "quantize-Q8_0.json", q)
    cardmod.write_card(unmeasured)  # the card lists every receipt's sha256
    report = verify_run(unmeasured.root, rebuild=True, toolchain=toolchain)
    by_variant = {r.variant: r for r in report.rebuilt}
    assert by_variant["Q8_0"].bit_exact and by_variant["Q4_K_M"].bit_exact
    assert by_variant["Q4_K_M"].toolchain_differences == ()
    assert by_variant["Q8_0"].toolchain_differences == (
        f"llama.cpp commit: {here['llama_cpp_commit']} here, 0123456 recorded",
        "CMake flags: only here: -DGGML_NATIVE=OFF, only recorded: -DGGML_NATIVE=ON",
        f"compiler: {here['compiler']} here, clang version 17.0.6 recorded",
        "CPU features: only recorded: avx512f",
        f"llama-quantize sha256: {here['binaries']['llama-quantize']['sha256']} here, {'f' * 64} recorded",
    )
    r8, r4 = by_variant["Q8_0"], by_variant["Q4_K_M"]
    assert f"rebuild Q4_K_M: {q['file'].replace('Q8_0', 'Q4_K_M')}: bit-exact ({r4.seconds:.1f} s) with the " \
           "recorded toolchain" in report.checks
    assert (f"rebuild Q8_0: {q['file']}: bit-exact ({r8.seconds:.1f} s) with another toolchain than the recorded one: "
            + "; ".join(r8.toolchain_differences)) in report.checks
    assert report.to_json()["rebuild"][[r.variant for r in report.rebuilt].index("Q8_0")][
        "toolchain_differences"] == list(r8.toolchain_differences)
