"""Recipe validation: YAML snippet -> recipe or the exact lines a user sees."""

import os
from pathlib import Path

import pytest

from mtpquant import recipe as rcp
from mtpquant.core.errors import RecipeError, UsageError

REPO = Path(__file__).resolve().parents[1]

BASE = """\
name: t
source: {synthetic: {}}
variants: [{type: Q4_K_M}]
"""


def load_text(tmp_path: Path, text: str) -> rcp.Recipe:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return rcp.load(p)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(RecipeError) as ei:
        load_text(tmp_path, text)
    prefix = f"{tmp_path / 'r.yaml'}: "
    assert all(p.startswith(prefix) for p in ei.value.problems), ei.value.problems
    return [p[len(prefix):] for p in ei.value.problems]


def test_minimal_recipe_defaults(tmp_path):
    r = load_text(tmp_path, BASE)
    assert r.name == "t"
    assert r.source.kind == "synthetic"
    assert [v.type for v in r.variants] == ["Q4_K_M"]
    assert r.mtp_require is True
    assert r.imatrix.kind == "none"
    assert r.smoke.enabled is False


@pytest.mark.parametrize("snippet, expected", [
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\nvarients: []\n",
     ["varients: unknown field (did you mean 'variants'?)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\npolcy: []\n",
     ["polcy: unknown field (did you mean 'policy'?)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_KM}]\n",
     ["variants[0].type: unknown quantization type 'Q4_KM' (did you mean Q4_K_M? valid: "
      + ", ".join(rcp.VARIANT_TYPES) + ")"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: yes}]\n",
     ["variants[0].type: expected a string, got boolean true (YAML reads yes/no/on/off/true/false as booleans: "
      "quote the value)"]),
    ("name: t\nsource: {hf: {repo: a/b, revision: 1.10, files: safetensors}}\nvariants: [{type: Q4_K_M}]\n",
     ["source.hf.revision: expected a string, got number 1.1 (YAML reads unquoted numbers (1.10 becomes 1.1): "
      "quote the value)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: []\n",
     ["variants: expected a non-empty list of variants, got a list (e.g. variants: [{type: Q4_K_M}])"]),
    ("source: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\n", ["name: missing required field"]),
    ("name: t\nsource: {synthetic: {}, path: x.gguf}\nvariants: [{type: Q4_K_M}]\n",
     ["source: give exactly one of synthetic, path, hf (got synthetic, path)"]),
    ("name: t\nsource: {path: missing.gguf}\nvariants: [{type: Q4_K_M}]\n",
     ["source.path: file not found: {dir}/missing.gguf (paths are relative to the recipe's folder)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\npolicy: [{match: 'eh_proj(', type: Q8_0}]\n",
     ["policy[0].match: invalid regular expression 'eh_proj(': missing ), unterminated subpattern at position 7"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\npolicy: [{match: eh_proj, type: Q8}]\n",
     ["policy[0].type: unknown tensor type 'Q8' (did you mean Q8_0? valid: " + ", ".join(rcp.TENSOR_TYPES) + ")"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\npolicy: [{type: Q8_0}]\n",
     ["policy[0]: a rule needs 'match' (a regex over full tensor names) and/or 'block' (nextn or trunk)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\npolicy: [{block: mtp, type: Q8_0}]\n",
     ["policy[0].block: unknown block role 'mtp' (valid: nextn, trunk)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}, {type: q4_k_m}]\n",
     ["variants: two variants would both write the Q4_K_M file (give one of them a distinct 'label')"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\nsmoke: {gate: {min_acceptance: 76}}\n",
     ["smoke.gate.min_acceptance: 76 is out of range (use a value between 0.0 and 1.0)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\nsmoke: {seeds: [1, 1]}\n",
     ["smoke.seeds: has duplicates"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\nimatrix: {compute: {corpus: nope.txt}}\n",
     ["imatrix.compute.corpus: file not found: {dir}/nope.txt (paths are relative to the recipe's folder)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\nimatrix: {file: {path: x}}\n",
     ["imatrix.file.sha256: missing required field",
      "imatrix.file.path: file not found: {dir}/x (paths are relative to the recipe's folder)"]),
    ("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\nmtp: {require: 'no'}\n",
     ["mtp.require: expected true or false, got a string 'no'"]),
    ("name: 'bad name'\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\n",
     ["name: 'bad name' is not a valid name (letters, digits, . _ -; it becomes the file prefix)"]),
])
def test_bad_recipes(tmp_path, snippet, expected):
    assert problems(tmp_path, snippet) == [e.replace("{dir}", str(tmp_path)) for e in expected]


def test_every_problem_reported_at_once(tmp_path):
    got = problems(tmp_path, "name: t\nsource: {synthetic: {}}\nvariants: [{type: Q9}]\npolcy: []\n"
                             "smoke: {seeds: [1, 1]}\n")
    assert len(got) == 3
    assert got[0].startswith("polcy: unknown field")


def test_invalid_yaml_names_line(tmp_path):
    got = problems(tmp_path, "name: t\nsource: {synthetic: {}\nvariants: []\n")
    assert len(got) == 1 and got[0].startswith("line ") and "invalid YAML" in got[0]


def test_empty_recipe(tmp_path):
    assert problems(tmp_path, "") == ["(top level): the recipe is empty"]


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UsageError) as ei:
        rcp.load(tmp_path / "nope.yaml")
    assert ei.value.one_line() == (f"{tmp_path / 'nope.yaml'}: recipe file not found (give the path of a .yaml "
                                   "recipe, e.g. recipes/demo-tiny.yaml)")


def test_variant_rules_and_nextn_role(tmp_path):
    r = load_text(tmp_path, BASE.replace("variants: [{type: Q4_K_M}]",
                                         "variants: [{type: IQ4_XS, policy: [{block: nextn, type: Q6_K}]}]"))
    (v,) = r.variants
    assert v.rules[0].block == "nextn" and v.rules[0].type == "Q6_K"
    assert v.rules[0].origin == "variants[0].policy[0]"


@pytest.mark.parametrize("name", ["demo-tiny.yaml", "hifi-q4km.yaml", "ladder-12-32gb.yaml"])
def test_shipped_recipes_validate(name):
    r = rcp.load(REPO / "recipes" / name)
    assert r.variants
    assert any(rule.block == "nextn" for rule in r.policy)


# ----------------------------------------------------------------------------------------------- hostile recipes

HOSTILE_BASE = "name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\n"


@pytest.mark.parametrize("snippet, expected", [
    ("name: t\nname: u\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\n",
     ["line 2, column 1: invalid YAML: duplicate key 'name'"]),
    ("name: t\nsource: {synthetic: {}, synthetic: {seed: 1}}\nvariants: [{type: Q4_K_M}]\n",
     ["line 2, column 25: invalid YAML: duplicate key 'synthetic'"]),
    (HOSTILE_BASE + "smoke: {gate: {min_speedup: .nan}}\n",
     ["smoke.gate.min_speedup: nan is not a finite number (YAML reads .nan and .inf as numbers: give a value)"]),
    (HOSTILE_BASE + "smoke: {gate: {min_acceptance: -.inf}}\n",
     ["smoke.gate.min_acceptance: -inf is not a finite number (YAML reads .nan and .inf as numbers: give a value)"]),
    (HOSTILE_BASE + "policy: [{match: '(a+)+$', type: Q8_0}]\n",
     ["policy[0].match: regular expression '(a+)+$' repeats a repetition, which can take exponential time (write it "
      "without a quantified group that itself holds a quantifier, e.g. (a+)+ -> a+)"]),
    (HOSTILE_BASE + "policy: [{match: '(blk|blk\\.)*x', type: Q8_0}]\n",
     ["policy[0].match: regular expression '(blk|blk\\\\.)*x' repeats alternatives that can match the same text, "
      "which can take exponential time (inside a repeated group, start each alternative with a different letter, "
      "e.g. (a|ab)* -> (ab?)*)"]),
    (HOSTILE_BASE + "card: {title: \"a\\tb\"}\n",
     ["card.title: has a line break or control character ('\\t' at position 1) (write the value on one line, "
      "without control characters)"]),
    (HOSTILE_BASE + "card: {license: \"mit\\r\\n<b>\"}\n",
     ["card.license: has a line break or control character ('\\r' at position 3) (write the value on one line, "
      "without control characters)"]),
    (HOSTILE_BASE + "card: {quantized_by: \"me\\u2028# x\", title: \"x\\N\"}\n",
     ["card.quantized_by: has a line break or control character ('\\u2028' at position 2) (write the value on one "
      "line, without control characters)",
      "card.title: has a line break or control character ('\\x85' at position 1) (write the value on one line, "
      "without control characters)"]),
])
def test_hostile_recipe_values(tmp_path, snippet, expected):
    assert problems(tmp_path, snippet) == expected


def test_paths_that_are_not_regular_files(tmp_path):
    """A folder, a FIFO and a device where files are expected: one line each, and no FIFO is opened (no hang)."""
    os.mkfifo(tmp_path / "corpus.txt")
    (tmp_path / "model.gguf").mkdir()
    got = problems(tmp_path, "name: t\nsource: {path: model.gguf}\nvariants: [{type: Q4_K_M}]\n"
                             "imatrix: {compute: {corpus: corpus.txt}}\neval: {text: /dev/zero}\n")
    assert got == [f"source.path: {tmp_path}/model.gguf is a directory, not a regular file (give a file)",
                   f"imatrix.compute.corpus: {tmp_path}/corpus.txt is a FIFO (named pipe), not a regular file "
                   "(give a file)",
                   "eval.text: /dev/zero is a character device, not a regular file (give a file)"]


def test_corpus_and_eval_text_must_be_utf8(tmp_path):
    (tmp_path / "corpus.txt").write_bytes("déjà vu ".encode() * 100 + b"\xff tail")
    (tmp_path / "eval.txt").write_bytes("ok\n".encode("utf-16"))
    got = problems(tmp_path, HOSTILE_BASE + "imatrix: {compute: {corpus: corpus.txt}}\neval: {text: eval.txt}\n")
    assert got == [f"imatrix.compute.corpus: {tmp_path}/corpus.txt: not UTF-8 (byte 1000) (save it as UTF-8 text)",
                   f"eval.text: {tmp_path}/eval.txt: not UTF-8 (byte 0) (save it as UTF-8 text)"]


def test_recipe_that_is_a_fifo_or_not_utf8(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(UsageError) as ei:
        rcp.load(tmp_path / "fifo.yaml")
    assert ei.value.one_line() == (f"{tmp_path / 'fifo.yaml'}: not a regular file (give the path of a .yaml "
                                   "recipe, e.g. recipes/demo-tiny.yaml)")
    (tmp_path / "latin1.yaml").write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(UsageError) as ei:
        rcp.load(tmp_path / "latin1.yaml")
    assert ei.value.one_line() == f"{tmp_path / 'latin1.yaml'}: not UTF-8 text (byte 9) (save the recipe as UTF-8)"
