"""The model card: rendered from a run directory's receipts only, through one StrictUndefined Jinja template.

Every value the card shows comes from `receipts/*.json`. The card step adds one receipt of its own,
`receipts/card.json`: what the card needs from outside the other receipts (the recipe's `card:` section, the
variant order, and text read from the GGUF such as the chat template), so that anyone holding the published
files can render the card again and compare (`mtpquant verify`).

Text from a recipe or a GGUF is data: it reaches the Markdown only through the escaping filters below, and the
template environment refuses to print any string that did not pass through one of them.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

import yaml
from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    TemplateError,
    UndefinedError,
)
from jinja2.runtime import Undefined

from mtpquant.core.errors import CardError, UsageError
from mtpquant.core.files import sha256_bytes, sha256_file, write_text_atomic
from mtpquant.core.rundir import RunDir
from mtpquant.modelfile.header import field_value, read_header
from mtpquant.recipe import model as rcp

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"  # a checkout; installed: mtpquant.templates


def _template_dir() -> Path:
    if TEMPLATE_DIR.is_dir():
        return TEMPLATE_DIR
    from importlib.resources import files

    return Path(str(files("mtpquant.templates")))
TEMPLATE = "model-card.md.j2"
CARD_FILE = "README.md"
CARD_STEP = "card"
SPEC_TYPE = "draft-mtp"  # the llama-server capability the card requires (smoke.SPEC_TYPE)
CHAT_ENDPOINT = "/v1/chat/completions"
BASE_TAGS = ("gguf", "mtp", "speculative-decoding")
RECEIPT_ENVELOPE = ("schema", "step", "variant", "mtpquant", "written_at")
EH_PROJ_RE = re.compile(r"^blk\.(\d+)\.nextn\.eh_proj\.weight$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
DRAFT_HEAD_TEXT = {
    "collected": "imatrix with NextN statistics",
    "pinned": "pinned (no NextN statistics)",
    "unweighted": "no NextN statistics",
    "no imatrix": "no imatrix",
}


# ----------------------------------------------------------------------------------------------- receipts as data

class Node(dict):
    """A receipt (or part of one) that knows where it came from, so a missing field is named in errors."""

    __slots__ = ("path", "where")

    def __init__(self, data: dict, where: str, path: str = ""):
        super().__init__()
        self.where = where
        self.path = path
        for key, value in data.items():
            self[key] = wrap(value, where, f"{path}.{key}" if path else str(key))

    def need(self, dotted: str):
        """The value at a dotted path, or a CardError naming the receipt file and the field."""
        node = self
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CardError(f"{self.where}: no field '{_join(self.path, dotted)}'",
                                "the receipt is older than this card step or was edited; rerun the step that "
                                "writes it")
            node = node[part]
        return node


def wrap(value, where: str, path: str):
    if isinstance(value, dict) and not isinstance(value, Node):
        return Node(value, where, path)
    if isinstance(value, list):
        return [wrap(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


class ReceiptUndefined(StrictUndefined):
    """StrictUndefined whose message names the receipt file and the missing field."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        obj = self._undefined_obj
        if isinstance(obj, Node) and isinstance(self._undefined_name, str):
            return f"{obj.where}: no field '{_join(obj.path, self._undefined_name)}'"
        return super()._undefined_message


def load_receipts(run: RunDir) -> dict[str, Node]:
    """Every receipts/*.json as a Node keyed by file name (sorted)."""
    out: dict[str, Node] = {}
    if not run.receipts.is_dir():
        raise CardError(f"{run.root}: no receipts/ folder", "is this a run directory made by `mtpquant build`?")
    for p in sorted(run.receipts.glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CardError(f"receipts/{p.name}: unreadable receipt ({exc})", "rerun the step that writes it") from None
        if not isinstance(data, dict):
            raise CardError(f"receipts/{p.name}: not a JSON object")
        out[p.name] = Node(data, f"receipts/{p.name}")
    return out


def receipt_sha256s(run: RunDir) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(run.receipts.glob("*.json"))} if run.receipts.is_dir() else {}


# ----------------------------------------------------------------------------------------------- escaping

class Md(str):
    """Text that is safe to place in Markdown as it is (escaped, or written by this module)."""


_MD_SPECIAL = re.compile(r"([\\`*\[\]|~])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # intraword _ never makes emphasis


def md_text(value) -> Md:
    """Prose: Markdown punctuation backslash-escaped, HTML characters as entities, one line."""
    if isinstance(value, Md):
        return value
    s = _scalar(value, "text")
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _MD_UNDERSCORE.sub(r"\\_", _MD_SPECIAL.sub(r"\\\1", s))
    return Md(re.sub(r"\s*\n\s*", " ", s))


def md_code(value, cell: bool = False) -> Md:
    """An inline code span that shows `value` literally (fence longer than any backtick run inside)."""
    s = " ".join(_scalar(value, "code").splitlines())
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or (s.startswith(" ") and s.endswith(" ") and s.strip()) \
        else ""
    if cell:
        s = s.replace("|", "\\|")  # GFM splits table cells on | even inside code spans
    return Md(f"{fence}{pad}{s}{pad}{fence}")


def md_fence(value, lang: str = "") -> Md:
    """A fenced code block that shows `value` literally, whatever backticks it holds."""
    s = _scalar(value, "block").rstrip("\n")
    longest = max((len(m) for m in re.findall(r"^\s*(`{3,}|~{3,})", s, re.MULTILINE)), default=0)
    fence = "`" * max(3, longest + 1)
    return Md(f"{fence}{lang}\n{s}\n{fence}")


def md_sha(value) -> Md:
    s = _scalar(value, "sha256")
    if not SHA_RE.match(s):
        raise CardError(f"a sha256 in the receipts is not 64 lowercase hex digits: {s[:80]!r}")
    return Md(f"`{s}`")


def _scalar(value, what: str) -> str:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if value is None or isinstance(value, (dict, list)):
        raise CardError(f"the card needs a {what} value here, the receipts hold {json.dumps(value)[:80]}")
    return str(value)


def _number(value, what: str) -> float:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardError(f"the card needs a number for {what}, the receipts hold {json.dumps(value)[:80]}")
    return float(value)


def fmt_num(value, spec: str = ".2f") -> Md:
    return Md(format(_number(value, "a figure"), spec))


def fmt_pct(value, digits: int = 1) -> Md:
    return Md(f"{100 * _number(value, 'a share'):.{digits}f} %")


def fmt_size(n) -> Md:
    b = _number(n, "a size")
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return Md(f"{b / scale:.2f} {unit}")
    return Md(f"{int(b)} B")


def fmt_fig(fig, kind: str) -> Md:
    """A smoke figure {"value", "ci95"} as text: `58.3 % (95% CI 57.7–58.9 %)`, `1.39× (...)`, `812.3 tok/s`."""
    if not isinstance(fig, dict) or "value" not in fig or "ci95" not in fig:
        where = f"{fig.where}: {fig.path}" if isinstance(fig, Node) else "a figure"
        raise CardError(f"{where}: expected {{value, ci95}}")
    value, ci = fig["value"], fig["ci95"]
    if value is None:
        return Md("not defined (no drafts)" if kind == "pct" else "not defined")
    one = {"pct": lambda x: f"{100 * x:.1f}", "x": lambda x: f"{x:.2f}", "tps": lambda x: f"{x:.1f}",
           "len": lambda x: f"{x:.2f}"}[kind]
    unit = {"pct": " %", "x": "×", "tps": " tok/s", "len": ""}[kind]
    text = f"{one(_number(value, 'a figure'))}{unit}"
    if ci:
        text += f" (95% CI {one(ci[0])}–{one(ci[1])}{unit})"
    return Md(text)


def _finalize(value):
    """Only escaped text and integers may be printed: a raw string or float in the template is a bug."""
    if type(value) is Undefined:  # the implicit else of `{{ x if cond }}` (the environment's own is strict)
        return ""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, Md):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise CardError(f"the card template printed a {type(value).__name__} ({str(value)[:60]!r}) without an "
                    "escaping filter")


class _CardEnvironment(Environment):
    """`receipt.field` means the field: a receipt key is never shadowed by a Python attribute of the Node."""

    NODE_METHODS = ("items", "keys", "values", "get")

    def getattr(self, obj, attribute):
        if isinstance(obj, Node):
            if attribute in obj:
                return obj[attribute]
            if attribute in self.NODE_METHODS:
                return getattr(obj, attribute)
            return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


def environment(template_dir: Path | None = None) -> Environment:
    env = _CardEnvironment(loader=FileSystemLoader(str(template_dir or _template_dir())), undefined=ReceiptUndefined, autoescape=False,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, finalize=_finalize)
    env.filters.update(text=md_text, code=md_code, fence=md_fence, sha=md_sha, num=fmt_num, pct=fmt_pct,
                       size=fmt_size, fig=fmt_fig, json=lambda v: Md(json.dumps(v, indent=2, ensure_ascii=False)))
    return env


def shell_command(argv: Iterable, bare: tuple[str, ...] = ("-s", "--metrics", "--no-webui", "--no-ppl")) -> str:
    """argv as a copy-pasteable shell command, one option (with its value) per continued line.

    `bare` options take no value, so a word after them starts a line of its own."""
    args = [shlex.quote(str(a)) for a in argv]
    if not args:
        raise CardError("an empty command was recorded")
    lines = [[args[0]]]
    for a in args[1:]:
        last = lines[-1]
        is_opt = a.startswith("-") and not re.fullmatch(r"-\d[\d.]*", a)
        if is_opt or len(lines) == 1 or last[0] in bare or (last[0].startswith("-") and len(last) == 2):
            lines.append([a])  # a new option, or a positional after an option that already has its value
        else:
            last.append(a)
    return " \\\n  ".join(" ".join(line) for line in lines)


# ----------------------------------------------------------------------------------------------- card inputs

def card_inputs(run: RunDir, recipe=None) -> dict:
    """What receipts/card.json records: the recipe's card section and variant order, and text from the GGUF."""
    if recipe is None:
        recipe = _recipe_of(run)
    if recipe is None:
        previous = run.read_receipt(CARD_STEP)
        if previous is None:
            raise CardError(f"{run.root}: no receipts/card.json and no recipe to take the card settings from",
                            "give the recipe: `mtpquant card RUN_DIR --recipe FILE`")
        return {k: v for k, v in previous.items() if k not in RECEIPT_ENVELOPE}
    receipts = {p.stem.removeprefix("quantize-"): p for p in sorted(run.receipts.glob("quantize-*.json"))}
    order = [v.tag for v in recipe.variants if v.tag in receipts]
    if not order:
        raise CardError(f"{run.root}: no quantize receipt for any variant of {recipe.path.name}",
                        "run `mtpquant build` first")
    first = json.loads(receipts[order[0]].read_text())
    return {
        "name": recipe.name,
        "title": recipe.card.title,
        "license": recipe.card.license,
        "quantized_by": recipe.card.quantized_by,
        "base_model": recipe.card.base_model,
        "recipe": {"file": recipe.path.name, "sha256": sha256_file(recipe.path)},
        "variants": order,
        "server_defaults": {"ctx": recipe.smoke.ctx, "draft_n_max": recipe.smoke.draft_n_max[0]},
        "gguf": gguf_text(run.root / first["file"]),
    }


def _recipe_of(run: RunDir):
    """The recipe that built the run (manifest.json names it), if it is still there and unchanged."""

    manifest = run.read_manifest()
    path = manifest.get("recipe")
    if not path or not Path(path).is_file():
        return None
    if manifest.get("recipe_sha256") and sha256_file(Path(path)) != manifest["recipe_sha256"]:
        if run.read_receipt(CARD_STEP) is not None:
            return None  # the card's inputs were recorded when it was built; keep them
        raise CardError(f"{path} changed since this run was built (manifest.json records sha256 "
                        f"{manifest['recipe_sha256']})", "pass the recipe explicitly with --recipe to use it anyway")
    return rcp.load(Path(path))


def gguf_text(path: Path) -> dict:
    """The free text a card shows from a GGUF's metadata (read from the header only)."""

    reader = read_header(path)
    template = field_value(reader, "tokenizer.chat_template")
    return {
        "file": path.name,
        "general_name": field_value(reader, "general.name"),
        "chat_template": template if isinstance(template, str) else None,
        "chat_template_sha256": sha256_bytes(template.encode()) if isinstance(template, str) else None,
    }


# ----------------------------------------------------------------------------------------------- context

def card_context(run: RunDir, inputs: dict | None = None) -> dict:
    """Everything the template sees: receipts as Nodes, plus values derived from them here."""
    receipts = load_receipts(run)
    if inputs is None:
        card = receipts.get(f"{CARD_STEP}.json")
        card = card if card is not None else Node(card_inputs(run), "receipts/card.json")
    else:
        card = Node(inputs, "receipts/card.json")
    source = receipts.get("source.json")
    if source is None:
        raise CardError("receipts/source.json is missing", "rerun `mtpquant build`")
    imatrix = receipts.get("imatrix.json")
    tags = list(card.need("variants"))
    tags += sorted(n[len("quantize-"):-5] for n in receipts if n.startswith("quantize-") and n[9:-5] not in tags)
    variants = [_variant(receipts, tag, source) for tag in tags]
    if not variants:
        raise CardError("no quantize receipts: nothing to describe", "run `mtpquant build` first")
    smoked = [v for v in variants if v["smoke"] is not None]
    kind = source.need("kind")
    base_model, base_note = _base_model(source, card)
    toolchain = _toolchain(variants[0]["q"].need("toolchain"))
    shas = receipt_sha256s(run)
    ctx = {
        "card": card,
        "title": md_text(card["title"] or card.need("name")),
        "name": card.need("name"),
        "source": source,
        "source_kind": kind,
        "base_model": base_model,
        "base_model_line": base_note,
        "imatrix": imatrix,
        "variants": variants,
        "smoked": smoked,
        "evaluated": [v for v in variants if v["eval"] is not None],
        "fitted": [v for v in variants if v["fit"] is not None],
        "toolchain": toolchain,
        "claims": [_claim(v) for v in smoked if v["smoke"].need("headline") is not None],
        "how_to_run": _how_to_run(smoked[0], toolchain) if smoked else _untested_run(variants[0], card),
        "caveats": _caveats(variants, source, toolchain),
        "not_measured": _not_measured(variants),
        "receipts": [{"file": name, "step": receipts[name].get("step"), "variant": receipts[name].get("variant"),
                      "sha256": shas[name]} for name in receipts],
        "quantize_commands": {v["tag"]: Md(shell_command(_display_command(v["q"], source))) for v in variants},
        "nextn_checked": all(bool(v["q"].need("checks").get("nextn_complete")) for v in variants),
        "imatrix_corpus": Path(str(imatrix.need("corpus"))).name if imatrix is not None else None,
        "pinned_imatrix": _pinned_imatrix(variants) if imatrix is None else None,
        "published": _published(receipts.get("publish.json")),
    }
    ctx["front_matter"] = Md(front_matter(ctx))
    return ctx


def _published(pub: Node | None) -> dict | None:
    """The repo and, for each artifact uploaded in shards, the shards (from receipts/publish.json)."""
    if pub is None:
        return None
    split = [{"file": name, "shards": a.need("shards")} for name, a in pub.need("artifacts").items()
             if a.need("shards")]
    return {"repo": pub.need("repo"), "limit": pub.need("split_max_size"), "split": split}


def _pinned_imatrix(variants: list[dict]) -> list[dict]:
    """Imatrix files the quantize receipts name when the run did not compute one (a file pinned by the recipe)."""
    out: dict[str, dict] = {}
    for v in variants:
        q = v["q"]
        sha = q.get("imatrix_sha256")
        if not sha:
            continue
        argv = [str(a) for a in q.need("command")]
        name = Path(argv[argv.index("--imatrix") + 1]).name if "--imatrix" in argv[:-1] else "(not in the command)"
        out.setdefault(sha, {"file": name, "sha256": sha, "variants": []})["variants"].append(v["tag"])
    return list(out.values())


def _variant(receipts: dict[str, Node], tag: str, source: Node) -> dict:
    q = receipts.get(f"quantize-{tag}.json")
    if q is None:
        raise CardError(f"receipts/quantize-{tag}.json is missing", "rerun `mtpquant build`")
    nextn_types = q.need("nextn_types")
    overrides = [line.rpartition("=")[0] for line in q.need("overrides")]
    eh = []
    for name, typ in nextn_types.items():
        if m := EH_PROJ_RE.match(name):
            how = "override" if any(re.search(p, name) for p in overrides) else "default"
            eh.append({"block": int(m.group(1)), "tensor": name, "type": typ, "how": how})
    fit = receipts.get(f"fit-{tag}.json")
    return {
        "tag": tag,
        "q": q,
        "smoke": receipts.get(f"smoke-{tag}.json"),
        "eval": receipts.get(f"eval-{tag}.json"),
        "fit": fit,
        "eh_proj": eh,
        "draft_head": DRAFT_HEAD_TEXT.get(q.need("draft_head"), q.need("draft_head")),
        "nextn_pins": [p for p in q.need("pins") if any(p.startswith(f"blk.{b}.") for b in q.need("nextn_blocks"))],
        "fit_summary": _fit_summary(fit) if fit is not None else None,
        "fit_grid": _fit_grid(fit) if fit is not None else None,
        "smoke_view": _smoke_view(receipts[f"smoke-{tag}.json"]) if f"smoke-{tag}.json" in receipts else None,
    }


def _base_model(source: Node, card: Node) -> tuple[str | None, Md]:
    """The Hub's base_model: the source repo for a Hugging Face source, else the recipe's (never invented)."""
    kind = source.need("kind")
    named = card.get("base_model")
    if kind == "hf":
        repo = source.need("repo")
        line = f"{md_code(repo)}, the repository the weights were taken from."
        if named and named != repo:
            line += f" The recipe names {md_code(named)}; the card keeps the repository the receipts record."
        return repo, Md(line)
    if kind == "synthetic":
        line = f"none: the source is a synthetic model made by {md_code(source.need('generator'))}."
        if named:
            line += f" The recipe's base_model {md_code(named)} is left out: these weights did not come from it."
        return None, Md(line)
    if named:
        return named, Md(f"{md_code(named)}, as the recipe states; the source was a local file, so the receipts "
                         "cannot confirm it.")
    return None, Md("not stated: the source was a local file and the recipe names no base model.")


def _toolchain(ident: Node) -> dict:
    binaries = ident.get("binaries") or {}
    quantize = binaries.get("llama-quantize") or {}
    flags = ident.get("cmake_flags")
    return {
        "commit": ident.get("llama_cpp_commit"),
        "package": ident.get("package"),
        "sdist_sha256": ident.get("sdist_sha256"),
        "cmake_flags": list(flags) if flags else None,
        "fp_contract": ident.get("fp_contract"),
        "compiler": ident.get("compiler"),
        "platform": "/".join(x for x in (ident.get("platform"), ident.get("machine")) if x) or None,
        "quantize_sha256": quantize.get("sha256"),
        "binaries": {k: v.get("sha256") for k, v in binaries.items()},
        "found_by": ident.get("source"),
        "cuda": None if flags is None else any(f.startswith("-DGGML_CUDA=ON") for f in flags),
    }


# ----------------------------------------------------------------------------------------------- smoke

def _smoke_view(s: Node) -> dict:
    """The smoke receipt's tables in card order: best k per category and seed, k sweep, chat vs raw."""
    results = s.need("results")
    chat = results.need("chat")
    best = chat.need("best_k")
    ks = list(chat.need("k").keys())
    per_k = chat["k"]
    view = {
        "best_k": best,
        "ks": [{"k": k, "g": per_k[k].need("overall"), "best": best is not None and str(best) == k} for k in ks],
        "best": per_k[str(best)] if best is not None else None,
        "vanilla": chat.need("vanilla"),
        "server": _server(s, best),
        "modes": list(results.keys()),
        "raw": None,
        "sweep": s.get("context_sweep"),
        "build": _build_line(s),
    }
    if "chat_vs_raw" in s:
        cvr = s["chat_vs_raw"]
        view["raw"] = {"k": cvr.need("k"), "chat": cvr.need("chat"), "raw": cvr.need("raw")}
    return view


def _build_line(s: Node) -> Md:
    """Which llama-server build and settings measured: what the receipt records, and that the machine is not."""
    tc = _toolchain(s.need("toolchain"))
    settings = s.need("settings")
    commit = f"llama.cpp {md_code(tc['commit'])}" if tc["commit"] else "llama.cpp commit not recorded"
    kind = {None: "build flags not recorded", True: "CUDA build", False: "CPU-only build"}[tc["cuda"]]
    threads = settings.get("threads")
    ngl = settings.get("gpu_layers")
    return Md(f"{commit}, {kind}; threads {int(threads) if threads is not None else 'default'}, GPU layers "
              f"{int(ngl) if ngl is not None else 'default'}; the machine itself is not recorded.")


def _server(s: Node, k) -> Node | None:
    label = f"k{k}" if k is not None else "vanilla"
    return next((srv for srv in s.need("servers") if srv.need("label") == label), None)


def _claim(v: dict) -> Md:
    s = v["smoke"]
    h = s.need("headline")
    settings = s.need("settings")
    suite = s.need("suite")
    return Md(
        f"**{md_text(v['tag'])}**: MTP draft acceptance {fmt_fig(h.need('acceptance'), 'pct')}, decode speedup "
        f"{fmt_fig(h.need('speedup'), 'x')} over the same llama-server without speculation "
        f"(`--spec-type {SPEC_TYPE} --spec-draft-n-max {int(h.need('k'))}`; {int(h.need('units'))} prompt × seed "
        f"units from {len(suite.need('selected'))} prompts of {md_code(_suite_name(suite))}, "
        f"{md_code(h.need('endpoint'))}, greedy, {int(settings.need('max_tokens'))} tokens each).")


def _suite_name(suite: Node) -> str:
    return Path(suite["file"]).name if suite.get("file") else "an inline prompt suite"


def _how_to_run(v: dict, toolchain: dict) -> dict:
    s = v["smoke"]
    view = v["smoke_view"]
    best = view["best_k"]
    server = view["server"]
    if server is None:
        raise CardError(f"{s.where}: no server recorded for k={best}")
    reqs = [r for r in s.need("requests") if r.need("endpoint") == CHAT_ENDPOINT]
    if not reqs:
        raise CardError(f"{s.where}: no {CHAT_ENDPOINT} request recorded")
    req = reqs[0]
    run = next((r for r in s.need("runs") if r.need("request") == req.need("id") and r.need("server") ==
                server.need("label")), None)
    argv = list(server.need("argv"))
    port = argv[argv.index("--port") + 1] if "--port" in argv else "8080"
    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    body = json.dumps(_plain(req.need("body")), indent=2, ensure_ascii=False)
    return {
        "tested": True,
        "variant": v["tag"],
        "command": Md(shell_command(argv)),
        "k": best,
        "body": body,
        "curl": Md(shell_command(["curl", "-s", f"http://{host}:{port}{CHAT_ENDPOINT}", "-H",
                                  "Content-Type: application/json", "-d", "@request.json"])),
        "answer": None if run is None else {"draft_n": int(run.need("draft_n")),
                                            "draft_n_accepted": int(run.need("draft_n_accepted")),
                                            "tok_s": fmt_num(run.need("timings.predicted_per_second"), ".1f"),
                                            "finish": run.get("finish_reason")},
        "request_id": req.need("id"),
    }


def _untested_run(v: dict, card: Node) -> dict:
    d = card.need("server_defaults")
    argv = ["llama-server", "-m", v["q"].need("file"), "-c", str(d.need("ctx")), "--spec-type", SPEC_TYPE,
            "--spec-draft-n-max", str(d.need("draft_n_max"))]
    body = {"messages": [{"role": "user", "content": "Write a haiku about draft models."}], "max_tokens": 64,
            "temperature": 0.0, "top_k": 1}
    return {"tested": False, "variant": v["tag"], "command": Md(shell_command(argv)),
            "k": d.need("draft_n_max"), "body": json.dumps(body, indent=2),
            "curl": Md(shell_command(["curl", "-s", f"http://127.0.0.1:8080{CHAT_ENDPOINT}", "-H",
                                      "Content-Type: application/json", "-d", "@request.json"])),
            "answer": None, "request_id": None}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------- fit

def _fit_summary(fit: Node) -> Md:
    """The smallest GPU size that holds the file at the receipt's first (ctx, KV type)."""
    rows = fit.need("rows")
    if not rows:
        raise CardError(f"{fit.where}: no rows")
    ctx, kv = rows[0].need("ctx"), rows[0].need("kv_type")
    cells = sorted((r for r in rows if r.need("ctx") == ctx and r.need("kv_type") == kv),
                   key=lambda r: r.need("vram_gb"))
    where = md_text(f"{int(ctx)} ctx, {kv} KV")
    smallest = " (the smallest size estimated)"
    full = next((r for r in cells if r.need("fit") == "fits"), None)
    if full is not None:
        return Md(f"{_gb(full['vram_gb'])}, {where}" + (smallest if full is cells[0] else ""))
    part = next((r for r in cells if r.need("fit") == "n-cpu-moe"), None)
    if part is not None:
        return Md(f"{_gb(part['vram_gb'])} with `--n-cpu-moe {int(part.need('n_cpu_moe'))}`, {where}")
    return Md(f"none up to {_gb(cells[-1]['vram_gb'])}, {where}")


def _gb(g) -> str:
    return f"{_number(g, 'a GPU size'):g} GB"


def _fit_grid(fit: Node) -> Md:
    rows = fit.need("rows")
    sizes = sorted({r.need("vram_gb") for r in rows})
    keys = list(dict.fromkeys((r.need("ctx"), r.need("kv_type")) for r in rows))
    cells = {(r["ctx"], r["kv_type"], r["vram_gb"]): r for r in rows}
    needs = {(n.need("ctx"), n.need("kv_type")): n for n in fit.need("needs")}
    lines = ["| Context | KV | Needs MiB | " + " | ".join(_gb(g) for g in sizes) + " |",
             "|---|---|---|" + "---|" * len(sizes)]
    for c, k in keys:
        n = needs.get((c, k))
        if n is None:
            raise CardError(f"{fit.where}: no 'needs' entry for ctx {c}, {k}")
        row = [str(int(c)), md_text(k), fmt_num(n.need("total_mib"), ".1f")]
        for g in sizes:
            r = cells.get((c, k, g))
            row.append("–" if r is None else {"fits": "fits", "no": "no"}.get(
                r.need("fit"), f"`--n-cpu-moe {int(r.need('n_cpu_moe'))}`"))
        lines.append("| " + " | ".join(row) + " |")
    return Md("\n".join(lines))


# ----------------------------------------------------------------------------------------------- caveats

def _caveats(variants: list[dict], source: Node, toolchain: dict) -> list[Md]:
    """Statements that follow from the receipts: each names the figures it rests on."""
    out: list[Md] = []
    if source.need("kind") == "synthetic":
        spec = source.need("spec")
        line = (f"The weights are synthetic ({md_code(source.need('generator'))}, seed {int(spec.need('seed'))}): "
                "a test artifact for the tooling, not a language model.")
        designed = spec.get("designed")
        if designed:
            line += (f" Its draft head was built to agree with the main model at a designed rate (alpha "
                     f"{fmt_num(designed.need('alpha'), '.2f')}, layout {md_text(designed.need('layout'))}, "
                     f"k {int(designed.need('k'))}), so its acceptance says nothing about a trained model.")
        out.append(Md(line))
    for v in variants:
        tag = md_text(v["tag"])
        if v["nextn_pins"]:
            out.append(Md(f"{tag}: {len(v['nextn_pins'])} NextN tensor(s) had no imatrix statistics and were pinned "
                          f"to an imatrix-free type: " + ", ".join(md_code(p) for p in v["nextn_pins"]) + "."))
        elif v["q"].need("draft_head") == "unweighted":
            out.append(Md(f"{tag}: the NextN block was quantized without importance statistics (the imatrix has "
                          "none for it)."))
        sv = v["smoke_view"]
        if sv is None:
            continue
        out += _smoke_caveats(tag, v["smoke"], sv)
    if any(v["fit"] is not None for v in variants):
        method = next(v["fit"] for v in variants if v["fit"] is not None).need("method")
        out.append(Md(f"GPU fit is not measured on a GPU: {md_text(method)}."))
    if toolchain["commit"] is None:
        out.append(Md(f"The llama.cpp commit and build flags were not recorded: the binaries were found via "
                      f"{md_code(toolchain['found_by'] or 'unknown')} without a toolchain identity."))
    return out


def _smoke_caveats(tag: Md, s: Node, sv: dict) -> list[Md]:
    out = []
    best = sv["best_k"]
    if best is None:
        return [Md(f"{tag}: no k gave a defined speedup, so no k is recommended.")]
    g = sv["best"].need("overall")
    sp = g.need("speedup")
    if sp["value"] is not None and sp["ci95"]:
        lo, hi = sp["ci95"]
        if hi < 1.0:
            out.append(Md(f"{tag}: MTP made decoding slower: speedup {fmt_fig(sp, 'x')} at the best measured k={best}."))
        elif lo <= 1.0:
            out.append(Md(f"{tag}: the speedup at k={best}, {fmt_fig(sp, 'x')}, is not distinguishable from 1.00× "
                          "at 95%."))
    best_sp = sp["value"]
    for row in sv["ks"]:
        k, kg = int(row["k"]), row["g"]
        ksp = kg.need("speedup")["value"]
        if k > int(best) and ksp is not None and best_sp is not None and ksp < best_sp:
            out.append(Md(f"{tag}: a longer draft window gave less speedup: k={k} gave "
                          f"{fmt_fig(kg.need('speedup'), 'x')} against {fmt_fig(sp, 'x')} at k={best} "
                          f"(acceptance {_pct_or_na(kg.need('acceptance')['value'])} against "
                          f"{_pct_or_na(g.need('acceptance')['value'])})."))
    diff = g.need("differs_from_vanilla")
    if int(diff.need("count")) > 0:
        out.append(Md(f"{tag}: {int(diff['count'])} of {int(diff.need('of'))} greedy responses at k={best} differed "
                      "from the same request without speculation."))
    raw = sv["raw"]
    if raw is not None:
        chat_acc, raw_acc = raw["chat"].need("acceptance"), raw["raw"].need("acceptance")
        if chat_acc["value"] is not None and raw_acc["value"] is not None:
            how = _compare(raw_acc, chat_acc, "was lower", "was higher", "was the same")
            out.append(Md(f"{tag}: acceptance with raw prompts to `/completion` (no chat template) {how}: "
                          f"{fmt_fig(raw_acc, 'pct')} against {fmt_fig(chat_acc, 'pct')} through "
                          f"{md_code(CHAT_ENDPOINT)} (k={int(raw['k'])}); speedup "
                          f"{fmt_fig(raw['raw'].need('speedup'), 'x')} against {fmt_fig(raw['chat'].need('speedup'), 'x')}."))
    sweep = sv["sweep"]
    if sweep is not None and "rows" in sweep:
        rows = [r for r in sweep["rows"] if "skipped" not in r and r.get("speedup") is not None]
        if len(rows) >= 2 and rows[-1]["speedup"] < rows[0]["speedup"]:
            out.append(Md(f"{tag}: longer prompts lowered the speedup: {fmt_num(rows[0]['speedup'], '.2f')}× at "
                          f"{int(rows[0].need('prompt_tokens'))} prompt tokens, {fmt_num(rows[-1]['speedup'], '.2f')}× "
                          f"at {int(rows[-1].need('prompt_tokens'))} (one request per length, so no CI)."))
    gates = s.get("gates")
    if gates is not None and gates.get("passed") is False:
        failed = []
        for name, c in gates.need("checks").items():
            if c.need("passed"):
                continue
            value = c.need("value")
            shown = "not measured" if value is None else (
                fmt_pct(value) if c.need("figure") == "acceptance" else f"{fmt_num(value, '.2f')}×")
            failed.append(f"{md_code(name)} {fmt_num(c.need('gate'), 'g')} ({md_text(c['figure'])} {shown})")
        where = f" at k={int(gates['k'])}" if gates.get("k") is not None else ""
        out.append(Md(f"{tag}: below the recipe's gate{where}: " + "; ".join(failed) + "."))
    return out


def _compare(a: dict, b: dict, lower: str, higher: str, same: str) -> str:
    """`lower`/`higher` only when a's 95% CI lies wholly below/above b's; else `same` (beyond the CIs)."""
    if a["ci95"] and b["ci95"]:
        if a["ci95"][1] < b["ci95"][0]:
            return lower
        if a["ci95"][0] > b["ci95"][1]:
            return higher
        return same + " within the 95% CIs"
    return lower if a["value"] < b["value"] else higher if a["value"] > b["value"] else same


def _pct_or_na(x) -> str:
    return "not defined" if x is None else fmt_pct(x)


def _not_measured(variants: list[dict]) -> list[Md]:
    out = []
    for key, what in (("smoke", "MTP acceptance and speedup in llama-server (no smoke receipt)"),
                      ("eval", "KL divergence and perplexity against the BF16 source (no eval receipt)"),
                      ("fit", "GPU memory fit (no fit receipt)")):
        missing = [v["tag"] for v in variants if v[key] is None]
        if missing:
            who = "any variant" if len(missing) == len(variants) else ", ".join(missing)
            out.append(Md(f"{md_text(what)}: not measured for {md_text(who)}."))
    return out


def _display_command(q: Node, source: Node) -> list[str]:
    """The recorded llama-quantize argv with machine-specific paths shown by file name."""
    argv = [str(a) for a in q.need("command")]
    final = q.need("file")
    source_names = set(source.need("files").keys()) | {source.need("file")}
    out = []
    for a in argv:
        name = Path(a).name
        if a.startswith("/") and name in source_names:
            out.append(name)
        elif re.fullmatch(rf"\.{re.escape(final)}\.\d+\.incomplete", name):
            out.append(final)
        else:
            out.append(a)
    return out


# ----------------------------------------------------------------------------------------------- front matter

def front_matter(ctx: dict) -> str:
    """Hub model-card metadata as YAML (dumped, never templated, so no name can break it)."""
    card = ctx["card"]
    types = list(dict.fromkeys(v["q"].need("type") for v in ctx["variants"]))
    data: dict = {}
    if ctx["base_model"]:
        data["base_model"] = ctx["base_model"]
        data["base_model_relation"] = "quantized"
    data["license"] = card.need("license")
    data["library_name"] = "gguf"
    data["tags"] = [*BASE_TAGS, *types]
    if card.get("quantized_by"):
        data["quantized_by"] = card["quantized_by"]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


# ----------------------------------------------------------------------------------------------- render / write

def render_card(run: RunDir, inputs: dict | None = None, template_dir: Path | None = None) -> str:
    """The card for a run directory, from its receipts (and receipts/card.json, or `inputs` in its place)."""
    template_dir = template_dir or _template_dir()
    ctx = card_context(run, inputs)
    try:
        template = environment(template_dir).get_template(TEMPLATE)
    except TemplateError as exc:
        raise CardError(f"cannot load the card template {template_dir / TEMPLATE}: {exc}",
                        "is mtpquant installed with its templates/ folder?") from None
    try:
        return template.render(ctx)
    except UndefinedError as exc:
        raise CardError(str(exc), "the receipt is older than this card step or was edited; rerun the step that "
                                  "writes it") from None


def write_card(run: RunDir, recipe=None) -> Path:
    """Record the card's inputs in receipts/card.json (only if they changed), render, write README.md atomically."""
    run = RunDir(Path(run.root))
    if not run.receipts.is_dir():
        raise UsageError(f"{run.root}: not a run directory (no receipts/)", "run `mtpquant build` first")
    inputs = card_inputs(run, recipe)
    previous = run.read_receipt(CARD_STEP)
    if previous is None or {k: v for k, v in previous.items() if k not in RECEIPT_ENVELOPE} != inputs:
        run.write_receipt(CARD_STEP, inputs)
    text = render_card(run)
    target = run.root / CARD_FILE
    write_text_atomic(target, text)
    return target
