"""Text from a GGUF (the chat template), a recipe, receipts or file names reaches the model card as data. Read by a
real CommonMark parser (markdown-it-py, with GFM tables) the card holds no HTML but its own `<details>`, the same
blocks and table columns whatever the text holds, and fences that close; every line break Unicode and CommonMark
know (CR, CRLF, NEL, LS, PS) is handled, and a Windows-style (CRLF) chat template leaves a card that verifies."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from click.testing import CliRunner
from hostile_gguf import with_string
from markdown_it import MarkdownIt

from mtpquant import recipe as rcp
from mtpquant import synth
from mtpquant.cli import main
from mtpquant.core.rundir import RunDir
from mtpquant.pipeline import build as pipeline
from mtpquant.report import card as cardmod
from mtpquant.report.card import md_code, md_fence, md_text, render_card, shell_command
from mtpquant.report.card.markdown import md_json

MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])
BREAKS = {"CR": "\r", "CRLF": "\r\n", "LF": "\n", "NEL": "\x85", "LS": "\u2028", "PS": "\u2029"}
HOSTILE = [
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<!-- open comment", "<div>\n\nblock</div>",
    "<http://example.com/autolink>", "&lt;entity&gt; &amp; &#60;", "[link](javascript:alert(1))",
    "![i](http://x/i.png)",
    "*em* _u_ **strong** ~~del~~ __init__", "`tick` ``two`` ```", "~~~", "| a | b |", "back\\slash \\| pipe\\",
    "# heading", "1. ordered", "7) ordered", "- bullet", "+ plus", "> quote", "===", "---", "    indented code",
    "\tTab", "trailing backslash \\", "a\x0bb\x0cc\x1cd\x1de\x1ef",
    *(f"line{sep}# heading{sep}- item{sep}<b>html</b>{sep}| x | y |{sep}```" for sep in BREAKS.values()),
]
CONTEXTS = {
    "alone": "{}\n",
    "line start after a paragraph line": "Some text\n{} and more\n",
    "list item": "- {}\n",
    "in a sentence": "Before {} after.\n",
    "heading": "# Title {}\n",
    "table cell": "| A | B |\n|---|---|\n| {} | x |\n",
}
WINDOWS_TEMPLATE = ("{%- for message in messages %}\r\n"
                    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\r\n"
                    "{%- endfor %}\r\n{%- if add_generation_prompt %}\r\n{{- '<|im_start|>assistant\\n' }}\r\n"
                    "{%- endif %}\r\n")
H2 = ["Files", "Requirements", "How to run", "Measurements", "Caveats", "Provenance", "Receipts", "License"]


def parse(text: str) -> list:
    """Block tokens of a Markdown text (the card's YAML front matter left out, as the Hub does)."""
    if text.startswith("---\n"):
        text = text.split("\n---\n", 1)[1]
    return MD.parse(text)


def shape(tokens) -> list[tuple]:
    """Every token's type and tag, inline children included: what the parser made of the text, not the words."""
    out = []
    for t in tokens:
        out.append((t.type, t.tag))
        out.extend((c.type, c.tag) for c in t.children or ())
    return out


def html(tokens) -> list[str]:
    found = [t.content for t in tokens if t.type == "html_block"]
    return found + [c.content for t in tokens for c in t.children or () if c.type == "html_inline"]


def words(tokens) -> str:
    return " ".join(" ".join(c.content for t in tokens for c in t.children or () if c.type == "text").split())


def one_line(value: str) -> str:
    return " ".join(value.split())


# ----------------------------------------------------------------------------------------------- the filters

@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("value", HOSTILE)
def test_text_is_plain_words_wherever_the_card_prints_it(value, context):
    """md_text: the blocks a benign word would make, only text tokens, and exactly the value's words."""
    tmpl = CONTEXTS[context]
    got, benign = parse(tmpl.format(md_text(value))), parse(tmpl.format("WORD"))
    assert shape(got) == shape(benign)
    assert not html(got)
    assert words(got) == one_line(words(benign).replace("WORD", one_line(value)))


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("value", [*HOSTILE, "", " "])
def test_code_shows_the_value_literally_on_one_line(value, context):
    tmpl = CONTEXTS[context]
    got = parse(tmpl.format(md_code(value, cell=context == "table cell")))
    benign = parse(tmpl.format("`WORD`"))
    assert shape(got) == shape(benign)
    (code,) = [c.content for t in got for c in t.children or () if c.type == "code_inline"]
    assert code == (" ".join(value.splitlines()) or " ")
    assert not html(got)


@pytest.mark.parametrize("value", [*HOSTILE, "\n".join(HOSTILE), WINDOWS_TEMPLATE])
def test_fence_holds_the_value_and_closes(value):
    """In the card's `<details>` block, as the chat template is shown: one fence, then the card goes on."""
    text = f"<details><summary>chat template</summary>\n\n{md_fence(value, 'jinja')}\n\n</details>\n\nAfter.\n"
    tokens = parse(text)
    assert [t.type for t in tokens] == ["html_block", "fence", "html_block", "paragraph_open", "inline",
                                        "paragraph_close"]
    assert html(tokens) == ["<details><summary>chat template</summary>\n", "</details>\n"]
    fence = tokens[1]
    assert fence.info == "jinja"
    assert fence.content == re.sub(r"\r\n?", "\n", value).rstrip("\n") + "\n"


def test_json_block_keeps_unicode_line_breaks_as_escapes():
    value = {"content": "".join(f"{name}{sep}" for name, sep in BREAKS.items()), "role": "<user>"}
    text = md_json(value)
    assert not set(text) & set(BREAKS.values()) - {"\n"}
    assert json.loads(text) == value
    (fence,) = parse(md_fence(text, "json") + "\n")
    assert json.loads(fence.content) == value


def test_shell_command_with_line_breaks_copies_back_exactly():
    """A recorded argument holding line breaks or quotes is written so that bash gives back the same bytes."""
    args = ["plain", "it's", "a b", *BREAKS.values(), "x\ty\x00z".replace("\x00", "\x01"), "--flag", "-1.5"]
    command = shell_command(["printf", "%s\\0", *args])
    assert not set(command) & set(BREAKS.values()) - {"\n"}
    assert all(line.endswith("\\") for line in command.split("\n")[:-1])  # one option per continued line
    out = subprocess.run(["bash", "-c", command], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == args


# ----------------------------------------------------------------------------------------------- fresh cards

def _build(folder, toolchain, template: str, recipe_extra: str = "", corpus: str | None = None) -> RunDir:
    folder.mkdir(parents=True)
    model = folder / "synth.gguf"
    synth.write_gguf(model, synth.SynthSpec(arch="qwen35moe", seed=5))
    with_string(model, folder / "src.gguf", "tokenizer.chat_template", template)
    text = "name: hostile\nsource: {path: src.gguf}\nvariants: [{type: Q8_0}]\n" + recipe_extra
    if corpus is not None:
        (folder / corpus).write_text((cardmod.TEMPLATE_DIR.parent / "data").joinpath("eval", "wiki-style-v1.txt")
                                     .read_text(encoding="utf-8")[:20000], encoding="utf-8")
        text += (f"imatrix: {{compute: {{corpus: {json.dumps(corpus)}, chunks: 2, ctx: 64, nextn: true}}}}\n"
                 "policy: [{block: nextn, match: 'nextn\\.eh_proj\\.weight$', type: Q8_0}]\n")
    (folder / "recipe.yaml").write_text(text, encoding="utf-8")
    r = rcp.load(folder / "recipe.yaml")
    pipeline.build(r, folder / "out", toolchain)
    return RunDir((folder / "out").resolve())


@pytest.fixture(scope="module")
def windows_run(tmp_path_factory, toolchain) -> RunDir:
    return _build(tmp_path_factory.mktemp("windows") / "w", toolchain, WINDOWS_TEMPLATE)


HOSTILE_TEMPLATE = "\n".join(HOSTILE) + "\r\n{{ '</details>' }}\r```\r\n"
HOSTILE_CORPUS = "corpus <b>x | `tick` # [l](u) *e* &amp;.txt"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, toolchain) -> RunDir:
    extra = "card: {title: '<b>T</b> | # [x](javascript:y) `z` *w*', license: '<i>mit</i> | x'}\n"
    return _build(tmp_path_factory.mktemp("hostile") / "h", toolchain, HOSTILE_TEMPLATE, extra, HOSTILE_CORPUS)


def _verify(run: RunDir):
    res = CliRunner().invoke(main, ["verify", str(run.root)])
    assert res.exit_code == 0, res.output
    assert f"ok  {cardmod.CARD_FILE}: identical to a fresh rendering" in res.stdout
    return res


def _template_fence(tokens) -> str:
    (fence,) = [t for t in tokens if t.type == "fence" and t.info == "jinja"]
    return fence.content


def test_windows_template_card_verifies(windows_run):
    """The card a build wrote for a GGUF whose chat template has CRLF line ends passes `mtpquant verify`."""
    raw = (windows_run.root / cardmod.CARD_FILE).read_bytes()
    assert b"\r" not in raw
    _verify(windows_run)
    tokens = parse(raw.decode("utf-8"))
    assert _template_fence(tokens) == WINDOWS_TEMPLATE.replace("\r\n", "\n")
    recorded = json.loads((windows_run.receipts / "card.json").read_text())
    assert recorded["gguf"]["chat_template"] == WINDOWS_TEMPLATE  # the receipt keeps the bytes; only the view is LF


def _assert_card_structure(text: str) -> list:
    tokens = parse(text)
    assert html(tokens) == ["<details><summary>chat template</summary>\n", "</details>\n"]
    heads = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h2"]
    assert heads == H2
    assert [t.tag for t in tokens if t.type == "heading_open"].count("h1") == 1
    rows, in_table = [], False
    for t in tokens:
        if t.type == "table_open":
            rows, in_table = [], True
        elif t.type == "tr_open":
            rows.append(0)
        elif t.type in ("th_open", "td_open"):
            rows[-1] += 1
        elif t.type == "table_close":
            assert in_table and len(set(rows)) == 1, f"a table row has another column count: {rows}"
            in_table = False
    assert {t.info for t in tokens if t.type == "fence"} <= {"sh", "json", "jinja", "text"}
    return tokens


def test_hostile_template_title_and_file_names_keep_the_card_whole(hostile_run):
    _verify(hostile_run)
    text = (hostile_run.root / cardmod.CARD_FILE).read_text(encoding="utf-8")
    tokens = _assert_card_structure(text)
    assert _template_fence(tokens) == re.sub(r"\r\n?", "\n", HOSTILE_TEMPLATE).rstrip("\n") + "\n"
    codes = [c.content for t in tokens for c in t.children or () if c.type == "code_inline"]
    assert HOSTILE_CORPUS in codes and "<i>mit</i> | x" in codes
    (h1,) = [tokens[i + 1] for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h1"]
    assert [c.type for c in h1.children] == ["text"]
    assert h1.children[0].content == "<b>T</b> | # [x](javascript:y) `z` *w*"


@pytest.mark.parametrize("sep", BREAKS)
def test_hostile_receipt_text_changes_no_block_of_the_card(hostile_run, tmp_path, sep):
    """card.json of a run made elsewhere is untrusted too: its title, license and template may hold anything."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(hostile_run.root, run.root)
    inputs = cardmod.card_inputs(run)
    benign = _assert_card_structure(render_card(run, {**inputs, "title": "T", "license": "mit"}))
    evil = BREAKS[sep].join(HOSTILE)
    inputs.update(title=evil, license=evil, quantized_by=evil)
    inputs["gguf"] = {**inputs["gguf"], "chat_template": evil}
    text = render_card(run, inputs)
    tokens = _assert_card_structure(text)
    assert shape(tokens) == shape(benign)
    if sep != "NEL":  # PyYAML writes a NEL unescaped in a quoted scalar and reads it back folded
        meta = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
        assert meta["license"] == meta["quantized_by"] == evil
