"""Recipe validation: YAML snippet -> recipe or the exact lines a user sees."""

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
