"""The model card: rendered from receipts only, valid Hub metadata, strict about missing values, text from a GGUF or
a recipe shown as escaped data, and a golden demo card."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from mtpquant.cli import main
from mtpquant.core.errors import CardError, ReceiptError
from mtpquant.core.rundir import RunDir
from mtpquant.llamacpp.perplexity import parse_final_ppl, run_perplexity
from mtpquant.measure.kld import default_text, run_source
from mtpquant.report import card as cardmod
from mtpquant.report.card import md_code, md_fence, md_text, render_card, write_card
from mtpquant.report.card.nodes import Node
from mtpquant.report.card.quality import quality_view
from mtpquant.report.card.smoke import user_argv

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from demo_run import build_run, measure

GOLDEN = Path(__file__).resolve().parent / "golden"
H2 = ["Files", "Requirements", "How to run", "Measurements", "Caveats", "Provenance", "Receipts", "License"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toolchain) -> dict:
    """One build; `bare` has no measurements, `measured` adds fit, eval (both variants) and smoke (Q4_K_M only)."""
    base = tmp_path_factory.mktemp("card")
    recipe, bare = build_run(base / "bare", toolchain)
    shutil.copytree(bare.root, base / "measured")
    measured = RunDir(base / "measured")
    measure(measured, recipe, toolchain)
    return {"recipe": recipe, "bare": bare, "measured": measured}


def copy_run(run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(run.root, dest)
    return RunDir(dest)


def receipt(run: RunDir, name: str) -> dict:
    return json.loads((run.receipts / name).read_text())


def put_receipt(run: RunDir, name: str, data: dict) -> None:
    (run.receipts / name).write_text(json.dumps(data, indent=2))


def readme(run: RunDir) -> str:
    return (run.root / "README.md").read_text()


# ----------------------------------------------------------------------------------------------- metadata

@pytest.mark.parametrize("which", ["bare", "measured"])
def test_front_matter_is_hub_metadata(runs, which):
    text = readme(runs[which])
    data = ModelCard(text).data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["quantized_by"] == "mtpquant-tests"
    assert data["tags"] == ["gguf", "mtp", "speculative-decoding", "Q4_K_M", "Q8_0"]
    # a synthetic source has no base model: none is invented
    assert "base_model" not in data and "base_model_relation" not in data
    assert "Base model: none: the source is a synthetic model made by `mtpquant.synth`." in text


def test_hf_source_names_its_repo_as_base_model(runs, tmp_path):
    run = copy_run(runs["bare"], tmp_path / "run")
    src = receipt(run, "source.json")
    src.update(kind="hf", provenance={"kind": "hf", "repo": "Qwen/Qwen3.6-35B-A3B", "revision": "main",
                                      "commit": "a" * 40, "format": "safetensors",
                                      "hf_files": [{"name": "model.safetensors", "size": 10, "sha256": "b" * 64}]})
    put_receipt(run, "source.json", src)
    data = ModelCard(render_card(run)).data
    assert data.base_model == "Qwen/Qwen3.6-35B-A3B"
    assert data.base_model_relation == "quantized"


def test_recipe_base_model_never_replaces_the_recorded_repo(runs, tmp_path):
    run = copy_run(runs["bare"], tmp_path / "run")
    src = receipt(run, "source.json")
    src.update(kind="hf", provenance={"kind": "hf", "repo": "Qwen/Qwen3.6-35B-A3B", "revision": "main",
                                      "commit": "a" * 40, "format": "gguf", "hf_files": []})
    put_receipt(run, "source.json", src)
    inputs = cardmod.card_inputs(run)
    inputs["base_model"] = "Qwen/Qwen3-Next-80B-A3B-Instruct"  # seed 004's provenance error
    text = render_card(run, inputs)
    assert ModelCard(text).data.base_model == "Qwen/Qwen3.6-35B-A3B"
    assert "The recipe names `Qwen/Qwen3-Next-80B-A3B-Instruct`; the card keeps the repository the receipts" in text


# ----------------------------------------------------------------------------------------------- body

def test_bare_card_says_what_was_not_measured(runs):
    text = readme(runs["bare"])
    assert [ln[3:] for ln in text.splitlines() if ln.startswith("## ")] == H2
    assert "MTP acceptance and decode speed were not measured for these files: this run has no smoke receipt." in text
    for line in ("- MTP acceptance and speedup in llama-server (no smoke receipt): not measured for any variant.",
                 ("- KL divergence and perplexity against the BF16 source (no eval receipt): not measured for any "
                  "variant."), "- GPU memory fit (no fit receipt): not measured for any variant."):
        assert line in text
    assert "### MTP smoke run" not in text and "Smallest GPU" not in text
    assert "was not run for these files" in text  # the untested command says so


def test_card_values_come_from_the_receipts(runs):
    run = runs["measured"]
    text = readme(run)
    for tag in ("Q4_K_M", "Q8_0"):
        q = receipt(run, f"quantize-{tag}.json")
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| `{q['file']}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == tag and cells[3] == f"{q['bits_per_weight']:.2f}" and cells[-1] == f"`{q['sha256']}`"
        assert cells[5] == "Q8_0 (override)"  # eh_proj kept at Q8_0 by the policy
        assert cells[4] == "imatrix with NextN statistics"
    s = receipt(run, "smoke-Q4_K_M.json")
    h = s["headline"]
    acc = f"{100 * h['acceptance']['value']:.1f} %"
    assert f"**Q4_K_M**: MTP draft acceptance {acc}" in text
    assert f"--spec-draft-n-max {h['k']}`" in text
    # the exact server command of the best k, and the body that run sent
    server = next(x for x in s["servers"] if x["label"] == f"k{s['best_k']}")
    assert "```sh\n" + cardmod.shell_command(user_argv(server["argv"])) + "\n```" in text
    body = next(r["body"] for r in s["requests"] if r["endpoint"] == "/v1/chat/completions")
    assert json.dumps(body, indent=2, ensure_ascii=False) in text
    assert "speculative" not in json.dumps(body)  # per-request speculative fields are ignored by the server
    e = receipt(run, "eval-Q8_0.json")
    assert f"| Q8_0 | {e['stats']['kld_mean']:.6f} ± {e['stats']['kld_mean_err']:.6f} |" in text
    assert "- MTP acceptance and speedup in llama-server (no smoke receipt): not measured for Q8_0." in text
    assert "### GPU memory fit (estimate)" in text



def plain_ppl(toolchain, model: Path, text: Path, ctx: int, chunks: int, log: Path) -> float:
    """`Final estimate: PPL` of one llama-perplexity run without KLD, through the project's runner (its log drain)."""
    argv = [toolchain.tool("llama-perplexity"), "-m", model, "-f", text, "-c", str(ctx), "-b", str(ctx),
            "--chunks", str(chunks)]
    lines: list[str] = []  # the estimate is logged on stderr: read every line, as the base-saving pass does
    run_perplexity(argv, log, on_line=lines.append)
    ppl = parse_final_ppl("\n".join(lines))
    assert ppl is not None, f"llama-perplexity printed no final PPL for {model.name}; log: {log}"
    return ppl


def test_ppl_ratio_divides_by_the_sources_own_perplexity(runs, toolchain, tmp_path):
    """The KLD pass floors the stored base log-probabilities 16 nats below the top logit; every text token of the
    synthetic model lies below, so that pass's PPL(base) is far from the source's. The card's ratio is PPL(Q) over
    the PPL of the pass that saved the base logits, and both equal what plain llama-perplexity runs measure."""
    run = runs["measured"]
    e = receipt(run, "eval-Q8_0.json")
    q = receipt(run, "quantize-Q8_0.json")
    source, _ = run_source(run)
    text = default_text()
    assert e["text"]["file"] == text.name
    src_ppl = plain_ppl(toolchain, source, text, e["ctx"], e["chunks"], tmp_path / "source.log")
    var_ppl = plain_ppl(toolchain, run.root / q["file"], text, e["ctx"], e["chunks"], tmp_path / "variant.log")
    assert e["base_logits"]["ppl"] == pytest.approx(src_ppl, rel=1e-6)
    assert e["stats"]["ppl_q"] == pytest.approx(var_ppl, rel=1e-6)
    assert e["stats"]["ppl_base"] < 0.5 * src_ppl, "the floored base of the KLD pass"
    row = next(ln for ln in readme(run).splitlines() if ln.startswith("| Q8_0 | "))
    ratio = e["stats"]["ppl_q"] / e["base_logits"]["ppl"]
    assert row.split(" | ")[6] == f"{ratio:.4f}" and ratio == pytest.approx(var_ppl / src_ppl, abs=1e-4)
    assert "A PPL(Q)/PPL(base) without ± divides PPL(Q) of the KLD pass" in readme(run)


def eval_node(ppl_base: float, own) -> Node:
    return Node({"stats": {"ppl_q": 12.5, "ppl_base": ppl_base, "ppl_ratio": 12.5 / ppl_base,
                           "ppl_ratio_err": 0.0123}, "base_logits": {"ppl": own}}, "receipts/eval-X.json")


@pytest.mark.parametrize("ppl_base, own, ratio, base", [
    (10.0, 10.0, "1.2500 ± 0.0123", "PPL(base) 10"),
    (10.0, 10.005, "1.2500 ± 0.0123", "PPL(base) 10"),  # within 0.1 %: the same measurement
    (10.0, None, "1.2500 ± 0.0123", "PPL(base) 10"),  # an older base without its own PPL: llama.cpp's figures
    (5.0, 10.0, "1.2500", "PPL(base) 10, from the pass that saved the base's logits; the KLD pass, which reads those "
                          "log-probabilities floored 16 nats below each position's top logit, gives 5 and a ratio of "
                          "2.5000, which the table does not use"),
])
def test_quality_view(ppl_base, own, ratio, base):
    v = quality_view(eval_node(ppl_base, own))
    assert (v["ratio"], v["base"], v["floored"]) == (ratio, base, own is not None and abs(own / ppl_base - 1) > 1e-3)


def test_every_receipt_is_listed_with_its_sha256(runs):
    run = runs["measured"]
    text = readme(run)
    for name, sha in cardmod.receipt_sha256s(run).items():
        assert f"| `receipts/{name}` |" in text and f"`{sha}` |" in text
    assert "receipts/card.json" in text


def test_caveats_follow_from_measurements(runs, tmp_path):
    run = copy_run(runs["measured"], tmp_path / "run")
    s = receipt(run, "smoke-Q4_K_M.json")
    best = s["best_k"]
    # make the raw endpoint clearly worse and a longer k clearly slower, as a receipt would record them
    s["chat_vs_raw"]["raw"]["acceptance"] = {"value": 0.1, "ci95": [0.05, 0.15]}
    s["chat_vs_raw"]["chat"]["acceptance"] = {"value": 0.7, "ci95": [0.65, 0.75]}
    at_best = s["results"]["chat"]["k"][str(best)]
    at_best["overall"]["speedup"] = {"value": 1.5, "ci95": [1.4, 1.6]}
    s["results"]["chat"]["k"]["9"] = {**at_best, "overall": {**at_best["overall"],
                                                             "speedup": {"value": 0.5, "ci95": [0.4, 0.6]}}}
    put_receipt(run, "smoke-Q4_K_M.json", s)
    text = render_card(run)
    assert ("Q4_K_M: acceptance with raw prompts to `/completion` (no chat template) was lower: 10.0 % (95% CI "
            "5.0–15.0 %) against 70.0 % (95% CI 65.0–75.0 %)") in text
    assert (f"Q4_K_M: a longer draft window gave less speedup: k=9 gave 0.50× (95% CI 0.40–0.60×) against 1.50× "
            f"(95% CI 1.40–1.60×) at k={best}") in text


def test_no_caveat_is_invented_without_measurements(runs):
    caveats = readme(runs["bare"]).split("## Caveats")[1].split("## Provenance")[0]
    assert "raw prompts" not in caveats and "draft window" not in caveats and "speedup" not in caveats


# ----------------------------------------------------------------------------------------------- strictness

@pytest.mark.parametrize("name, path, message", [
    ("smoke-Q4_K_M.json", ["settings", "max_tokens"], "receipts/smoke-Q4_K_M.json: no field 'settings.max_tokens'"),
    ("eval-Q4_K_M.json", ["stats", "kld_mean"], "receipts/eval-Q4_K_M.json: no field 'stats.kld_mean'"),
    ("fit-Q8_0.json", ["weights", "total_mib"], "receipts/fit-Q8_0.json: no field 'weights.total_mib'"),
])
def test_missing_receipt_value_is_an_error(runs, tmp_path, name, path, message):
    run = copy_run(runs["measured"], tmp_path / "run")
    data = receipt(run, name)
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    put_receipt(run, name, data)
    with pytest.raises(CardError) as ei:
        render_card(run)
    assert ei.value.message == message


@pytest.mark.parametrize("name, field", [("quantize-Q4_K_M.json", "bits_per_weight"), ("source.json", "n_elements")])
def test_a_receipt_lacking_one_of_its_fields_is_refused_by_its_typed_read(runs, tmp_path, name, field):
    """Top-level fields are the receipt kind's own (core/receipts.py): the one read path refuses a receipt without
    one, before the card looks at it."""
    run = copy_run(runs["measured"], tmp_path / "run")
    data = receipt(run, name)
    del data[field]
    put_receipt(run, name, data)
    with pytest.raises(ReceiptError) as ei:
        render_card(run)
    assert ei.value.message == f"{run.receipts / name}: lacks {field}"


def test_null_where_a_number_is_shown_is_an_error(runs, tmp_path):
    run = copy_run(runs["bare"], tmp_path / "run")
    q = receipt(run, "quantize-Q8_0.json")
    q["bytes"] = None
    put_receipt(run, "quantize-Q8_0.json", q)
    with pytest.raises(CardError, match="the card needs a number for a size, the receipts hold null"):
        render_card(run)


def test_template_may_not_print_unescaped_text(runs, tmp_path):
    (tmp_path / cardmod.TEMPLATE).write_text("{{ name }}\n")
    with pytest.raises(CardError, match="printed a str .* without an escaping filter"):
        render_card(runs["bare"], template_dir=tmp_path)
    (tmp_path / cardmod.TEMPLATE).write_text("{{ no_such_value | text }}\n")
    with pytest.raises(CardError, match="'no_such_value' is undefined"):
        render_card(runs["bare"], template_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- text as data

EVIL_TEMPLATE = "{{ evil }}{% for m in messages %}```\n<script>alert(1)</script>{% endfor %}\n````"


def test_chat_template_and_names_are_escaped_data(runs, tmp_path):
    run = copy_run(runs["bare"], tmp_path / "run")
    inputs = cardmod.card_inputs(run)
    inputs["gguf"]["chat_template"] = EVIL_TEMPLATE
    inputs["title"] = "{{ evil }} *bold* <b>x</b> [link](http://x) | pipe"
    text = render_card(run, inputs)  # no Jinja error: the template text is never rendered
    assert "# {{ evil }} \\*bold\\* &lt;b&gt;x&lt;/b&gt; \\[link\\](http://x) \\| pipe\n" in text
    block = re.search(r"^(`{5,})jinja\n(.*?)\n\1$", text, re.DOTALL | re.MULTILINE)
    assert block and block.group(2) == EVIL_TEMPLATE  # verbatim, in a fence longer than any inside
    assert text.count("<script>") == 1  # only inside the code block
    ModelCard(text)


@pytest.mark.parametrize("value, expected", [
    ("Q4_K_M", "Q4_K_M"),
    ("_x_ *y*", "\\_x\\_ \\*y\\*"),
    ("a|b <i>&", "a\\|b &lt;i&gt;&amp;"),
    ("two\nlines", "two lines"),
    ("`code`", "\\`code\\`"),
])
def test_md_text(value, expected):
    assert md_text(value) == expected


@pytest.mark.parametrize("value, cell, expected", [
    ("plain", False, "`plain`"),
    ("a`b", False, "``a`b``"),
    ("`x`", False, "`` `x` ``"),
    ("a|b", True, "`a\\|b`"),
])
def test_md_code(value, cell, expected):
    assert md_code(value, cell=cell) == expected


def test_md_fence_is_longer_than_any_fence_inside():
    assert md_fence("a\n````\nb", "text") == "`````text\na\n````\nb\n`````"


# ----------------------------------------------------------------------------------------------- writing

def test_write_card_is_idempotent(runs, tmp_path):
    run = copy_run(runs["measured"], tmp_path / "run")
    before = (run.receipts / "card.json").read_bytes(), readme(run)
    write_card(run, runs["recipe"])
    assert ((run.receipts / "card.json").read_bytes(), readme(run)) == before
    assert not list(run.root.glob(".*.incomplete"))


def test_card_command(runs, tmp_path):
    run = copy_run(runs["measured"], tmp_path / "run")
    expected = readme(run)
    (run.root / "README.md").unlink()
    res = CliRunner().invoke(main, ["card", str(run.root), "--recipe", str(runs["recipe"].path)])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"wrote {run.root.resolve() / 'README.md'}\n"
    assert readme(run) == expected
    res = CliRunner().invoke(main, ["card", str(run.root), "--stdout"])
    assert res.exit_code == 0 and res.stdout == expected


def test_card_command_error_is_one_line(tmp_path):
    (tmp_path / "receipts").mkdir()
    res = CliRunner().invoke(main, ["card", str(tmp_path)])
    assert res.exit_code == 1
    assert res.stderr == (f"error: {tmp_path.resolve()}: no receipts/card.json and no recipe to take the card "
                          "settings from (give the recipe: `mtpquant card RUN_DIR --recipe FILE`)\n")


# ----------------------------------------------------------------------------------------------- golden

def test_golden_demo_card(tmp_path):
    """The demo run's receipts (tests/golden/demo-run) render to exactly tests/golden/demo-card.md.

    After a deliberate change to the card, accept it with `python tests/golden/regen.py`."""
    run = RunDir(tmp_path / "demo")
    shutil.copytree(GOLDEN / "demo-run", run.root)
    got = render_card(run)
    want = (GOLDEN / "demo-card.md").read_text(encoding="utf-8")
    assert got == want, "the demo card changed; review the diff, then run python tests/golden/regen.py"


def test_golden_has_the_layout_of_a_fresh_card(runs):
    def layout(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.startswith("## ")]

    golden = (GOLDEN / "demo-card.md").read_text(encoding="utf-8")
    assert layout(golden) == layout(readme(runs["measured"])) == [f"## {h}" for h in H2]
    ModelCard(golden)
