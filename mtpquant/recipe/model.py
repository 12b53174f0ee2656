"""Recipes: YAML files validated in full before any long step; every problem reported at once."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtpquant.core.errors import RecipeError, UsageError
from mtpquant.synth import PRESETS

# llama-quantize's own ftype names (tools/quantize/quantize.cpp QUANT_OPTIONS), less aliases and COPY.
VARIANT_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
    "Q5_K_S", "Q5_K_M", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS",
    "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE", "F16", "BF16",
)
# ggml tensor types a rule may ask for (names as gguf-py's GGMLQuantizationType spells them).
TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K", "Q2_K",
    "IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
    "MXFP4",
)
BLOCK_ROLES = ("nextn", "trunk")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Rule:
    """One policy rule: tensors whose full name matches `match` (re.search, like llama.cpp) and/or that sit in
    the given block role get `type`."""

    type: str
    match: str | None = None
    block: str | None = None  # "nextn": the draft block(s), whatever their index; "trunk": the main layers
    origin: str = ""  # field path in the recipe, for messages

    def describe(self) -> str:
        parts = []
        if self.block:
            parts.append(f"block={self.block}")
        if self.match:
            parts.append(f"match={self.match!r}")
        return f"{self.origin} ({', '.join(parts)} -> {self.type})"


@dataclass(frozen=True)
class Variant:
    type: str
    rules: tuple[Rule, ...] = ()  # variant-specific rules, tried before the recipe's policy
    label: str = ""  # file-name tag; defaults to the type

    @property
    def tag(self) -> str:
        return self.label or self.type


@dataclass(frozen=True)
class HfSource:
    repo: str
    revision: str
    files: str  # a GGUF file name / first shard / glob, or "safetensors"
    pre_tokenizer: str | None = None


@dataclass(frozen=True)
class Source:
    kind: str  # synthetic | path | hf
    path: Path | None = None
    sha256: str | None = None
    synthetic: dict = field(default_factory=dict)
    hf: HfSource | None = None


@dataclass(frozen=True)
class Expect:
    arch: str | None = None
    main_layers: int | None = None
    nextn_layers: int | None = None
    shape: str | None = None  # a synth preset with the real model's tensor inventory, for `plan --stand-in`


@dataclass(frozen=True)
class HubFileRef:
    repo: str
    revision: str
    path: str


@dataclass(frozen=True)
class ImatrixSpec:
    kind: str = "none"  # none | file | compute
    path: Path | None = None
    sha256: str | None = None
    hf: HubFileRef | None = None  # a pinned imatrix file on Hugging Face instead of a local path
    corpus: Path | None = None
    chunks: int = 64
    ctx: int = 512
    nextn: bool = True
    uncovered: str = "error"  # error | pin
    pin_type: str = "Q8_0"


@dataclass(frozen=True)
class Gates:
    min_acceptance: float | None = None
    min_speedup: float | None = None


@dataclass(frozen=True)
class SmokeSpec:
    enabled: bool = False
    seeds: tuple[int, ...] = (42,)
    draft_n_max: tuple[int, ...] = (3,)
    max_tokens: int = 64
    prompts: int | None = None  # use the first N prompts of the suite (None: all)
    raw: bool = False  # also measure raw /completion prompts
    ctx: int = 4096
    context_sweep: tuple[int, ...] = ()
    threads: int | None = None
    gpu_layers: int | None = None
    gates: Gates = Gates()
    variant_gates: dict = field(default_factory=dict)  # variant tag -> Gates


@dataclass(frozen=True)
class EvalSpec:
    enabled: bool = False
    text: Path | None = None
    ctx: int = 128
    chunks: int = 16


@dataclass(frozen=True)
class FitSpec:
    vram_gb: tuple[float, ...] = (12, 16, 24, 32)
    ctx: tuple[int, ...] = (4096, 32768, 131072)
    kv: tuple[str, ...] = ("f16", "q8_0")


@dataclass(frozen=True)
class CardSpec:
    license: str = "other"
    quantized_by: str | None = None
    base_model: str | None = None
    title: str | None = None


@dataclass(frozen=True)
class PublishSpec:
    repo: str | None = None
    private: bool = False


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    source: Source
    expect: Expect
    mtp_require: bool
    imatrix: ImatrixSpec
    policy: tuple[Rule, ...]
    variants: tuple[Variant, ...]
    smoke: SmokeSpec
    eval: EvalSpec
    fit: FitSpec
    card: CardSpec
    publish: PublishSpec
    raw: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


# ----------------------------------------------------------------------------------------------- checking

_MISSING = object()


class _Checker:
    """Collects `FILE: field.path: problem (hint)` lines while reading a YAML tree."""

    def __init__(self, file: Path):
        self.file = file
        self.problems: list[str] = []

    def bad(self, path: str, problem: str, hint: str | None = None) -> None:
        self.problems.append(f"{self.file}: {path or '(top level)'}: {problem}" + (f" ({hint})" if hint else ""))

    def mapping(self, value: Any, path: str, allowed: dict[str, bool]) -> dict | None:
        """A dict with only known keys; allowed maps key -> required."""
        if not isinstance(value, dict):
            self.bad(path, f"expected a mapping, got {_kind(value)}")
            return None
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                near = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
                hint = f"did you mean '{near[0]}'?" if near else "known fields: " + ", ".join(sorted(allowed))
                self.bad(_join(path, str(key)), "unknown field", hint)
        for key, required in allowed.items():
            if required and key not in value:
                self.bad(_join(path, key), "missing required field")
        return value

    def string(self, value: Any, path: str, pattern: re.Pattern | None = None, what: str = "") -> str | None:
        if value is _MISSING or value is None:
            return None
        if isinstance(value, bool):
            self.bad(path, f"expected a string, got boolean {str(value).lower()}",
                     "YAML reads yes/no/on/off/true/false as booleans: quote the value")
            return None
        if isinstance(value, (int, float)):
            self.bad(path, f"expected a string, got number {value!r}",
                     "YAML reads unquoted numbers (1.10 becomes 1.1): quote the value")
            return None
        if not isinstance(value, str):
            self.bad(path, f"expected a string, got {_kind(value)}")
            return None
        if pattern is not None and not pattern.match(value):
            self.bad(path, f"{value!r} is not a valid {what}")
            return None
        return value

    def integer(self, value: Any, path: str, lo: int | None = None, hi: int | None = None) -> int | None:
        if value is _MISSING or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(path, f"expected an integer, got {_kind(value)} {value!r}")
            return None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"from {lo}" + (f" to {hi}" if hi is not None else "")
            self.bad(path, f"{value} is out of range", f"use a value {rng}")
            return None
        return value

    def number(self, value: Any, path: str, lo: float | None = None, hi: float | None = None) -> float | None:
        if value is _MISSING or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.bad(path, f"expected a number, got {_kind(value)} {value!r}")
            return None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.bad(path, f"{value} is out of range", f"use a value between {lo} and {hi}")
            return None
        return float(value)

    def boolean(self, value: Any, path: str) -> bool | None:
        if value is _MISSING or value is None:
            return None
        if not isinstance(value, bool):
            self.bad(path, f"expected true or false, got {_kind(value)} {value!r}")
            return None
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...], what: str, fold: bool = True) -> str | None:
        s = self.string(value, path)
        if s is None:
            return None
        canon = s.upper() if fold else s
        if canon in choices:
            return canon
        near = difflib.get_close_matches(canon, list(choices), n=1, cutoff=0.6)
        hint = (f"did you mean {near[0]}? " if near else "") + "valid: " + ", ".join(choices)
        self.bad(path, f"unknown {what} {s!r}", hint)
        return None

    def int_list(self, value: Any, path: str, lo: int = 0, hi: int | None = None) -> tuple[int, ...] | None:
        if value is _MISSING or value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            self.bad(path, f"expected a non-empty list of integers, got {_kind(value)}")
            return None
        out = [self.integer(v, f"{path}[{i}]", lo, hi) for i, v in enumerate(value)]
        if any(v is None for v in out):
            return None
        if len(set(out)) != len(out):
            self.bad(path, "has duplicates")
            return None
        return tuple(out)  # type: ignore[arg-type]

    def regex(self, value: Any, path: str) -> str | None:
        s = self.string(value, path)
        if s is None:
            return None
        try:
            re.compile(s)
        except re.error as exc:
            self.bad(path, f"invalid regular expression {s!r}: {exc}")
            return None
        return s

    def path(self, value: Any, path: str, base: Path, must_exist: bool = True) -> Path | None:
        s = self.string(value, path)
        if s is None:
            return None
        p = Path(s).expanduser()
        p = p if p.is_absolute() else (base / p)
        if must_exist and not p.exists():
            self.bad(path, f"file not found: {p}", "paths are relative to the recipe's folder")
            return None
        return p


def _presets() -> tuple[str, ...]:

    return tuple(PRESETS)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# ----------------------------------------------------------------------------------------------- sections

def _rules(c: _Checker, value: Any, path: str) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        c.bad(path, f"expected a list of rules, got {_kind(value)}")
        return ()
    rules = []
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        d = c.mapping(item, p, {"match": False, "block": False, "type": True})
        if d is None:
            continue
        match = c.regex(d.get("match"), f"{p}.match")
        block = c.choice(d.get("block"), f"{p}.block", BLOCK_ROLES, "block role", fold=False) \
            if "block" in d else None
        typ = c.choice(d.get("type"), f"{p}.type", TENSOR_TYPES, "tensor type") if "type" in d else None
        if "match" not in d and "block" not in d:
            c.bad(p, "a rule needs 'match' (a regex over full tensor names) and/or 'block' (nextn or trunk)")
        if typ and (match or block):
            rules.append(Rule(type=typ, match=match, block=block, origin=p))
    return tuple(rules)


def _source(c: _Checker, value: Any, base: Path) -> Source | None:
    d = c.mapping(value, "source", {"synthetic": False, "path": False, "sha256": False, "hf": False})
    if d is None:
        return None
    kinds = [k for k in ("synthetic", "path", "hf") if k in d]
    if len(kinds) != 1:
        c.bad("source", "give exactly one of synthetic, path, hf" + (f" (got {', '.join(kinds)})" if kinds else ""))
        return None
    kind = kinds[0]
    sha = c.string(d.get("sha256"), "source.sha256", SHA_RE, "sha256 (64 lowercase hex digits)")
    if kind == "path":
        p = c.path(d["path"], "source.path", base)
        if p is not None and p.suffix != ".gguf":
            c.bad("source.path", f"{p.name} is not a .gguf file",
                  "give a BF16/F16 GGUF (first shard for a split model); safetensors come through source.hf")
            return None
        return Source("path", path=p, sha256=sha) if p else None
    if kind == "synthetic":
        syn = d["synthetic"]
        if syn is None:
            syn = {}
        if not isinstance(syn, dict):
            c.bad("source.synthetic", f"expected a mapping of generator options, got {_kind(syn)}")
            return None
        return Source("synthetic", synthetic=dict(syn))
    h = c.mapping(d["hf"], "source.hf", {"repo": True, "revision": True, "files": True, "pre_tokenizer": False})
    if h is None:
        return None
    repo = c.string(h.get("repo"), "source.hf.repo", REPO_RE, "repo id (owner/name)")
    rev = c.string(h.get("revision"), "source.hf.revision")
    files = c.string(h.get("files"), "source.hf.files")
    pre = c.string(h.get("pre_tokenizer"), "source.hf.pre_tokenizer")
    if repo and rev and files:
        return Source("hf", sha256=sha, hf=HfSource(repo, rev, files, pre))
    return None


def _imatrix(c: _Checker, value: Any, base: Path) -> ImatrixSpec:
    if value is None:
        return ImatrixSpec()
    d = c.mapping(value, "imatrix", {"file": False, "compute": False, "uncovered": False, "pin_type": False})
    if d is None:
        return ImatrixSpec()
    uncovered = c.choice(d.get("uncovered", "error"), "imatrix.uncovered", ("error", "pin"), "policy",
                         fold=False) or "error"
    pin = c.choice(d.get("pin_type", "Q8_0"), "imatrix.pin_type", TENSOR_TYPES, "tensor type") or "Q8_0"
    if ("file" in d) == ("compute" in d):
        c.bad("imatrix", "give exactly one of file, compute")
        return ImatrixSpec(uncovered=uncovered, pin_type=pin)
    if "file" in d:
        f = c.mapping(d["file"], "imatrix.file", {"path": False, "hf": False, "sha256": True})
        if f is None:
            return ImatrixSpec()
        sha = c.string(f.get("sha256"), "imatrix.file.sha256", SHA_RE, "sha256 (64 lowercase hex digits)")
        if ("path" in f) == ("hf" in f):
            c.bad("imatrix.file", "give exactly one of path, hf")
            return ImatrixSpec()
        if "hf" in f:
            h = c.mapping(f["hf"], "imatrix.file.hf", {"repo": True, "revision": True, "path": True})
            if h is None:
                return ImatrixSpec()
            ref = HubFileRef(c.string(h.get("repo"), "imatrix.file.hf.repo", REPO_RE, "repo id (owner/name)"),
                             c.string(h.get("revision"), "imatrix.file.hf.revision"),
                             c.string(h.get("path"), "imatrix.file.hf.path"))
            return ImatrixSpec("file", hf=ref, sha256=sha, uncovered=uncovered, pin_type=pin)
        p = c.path(f.get("path"), "imatrix.file.path", base)
        return ImatrixSpec("file", path=p, sha256=sha, uncovered=uncovered, pin_type=pin)
    f = c.mapping(d["compute"], "imatrix.compute", {"corpus": True, "chunks": False, "ctx": False, "nextn": False})
    if f is None:
        return ImatrixSpec()
    corpus = c.path(f.get("corpus"), "imatrix.compute.corpus", base)
    chunks = c.integer(f.get("chunks", 64), "imatrix.compute.chunks", 1, 100000)
    ctx = c.integer(f.get("ctx", 512), "imatrix.compute.ctx", 32, 1 << 20)
    nextn = c.boolean(f.get("nextn", True), "imatrix.compute.nextn")
    return ImatrixSpec("compute", corpus=corpus, chunks=chunks or 64, ctx=ctx or 512,
                       nextn=True if nextn is None else nextn, uncovered=uncovered, pin_type=pin)


def _gates(c: _Checker, value: Any, path: str) -> Gates:
    d = c.mapping(value, path, {"min_acceptance": False, "min_speedup": False})
    if d is None:
        return Gates()
    return Gates(c.number(d.get("min_acceptance"), f"{path}.min_acceptance", 0.0, 1.0),
                 c.number(d.get("min_speedup"), f"{path}.min_speedup", 0.0, 100.0))


def _smoke(c: _Checker, value: Any) -> SmokeSpec:
    if value is None:
        return SmokeSpec()
    d = c.mapping(value, "smoke", {"enabled": False, "seeds": False, "draft_n_max": False, "max_tokens": False,
                                   "prompts": False, "raw": False, "ctx": False, "context_sweep": False,
                                   "threads": False, "gpu_layers": False, "gate": False, "variant_gates": False})
    if d is None:
        return SmokeSpec()
    default = SmokeSpec()
    variant_gates = {}
    vg = d.get("variant_gates")
    if vg is not None:
        if not isinstance(vg, dict):
            c.bad("smoke.variant_gates", f"expected a mapping of variant tag -> gate, got {_kind(vg)}")
        else:
            variant_gates = {str(k): _gates(c, v, f"smoke.variant_gates.{k}") for k, v in vg.items()}
    enabled = c.boolean(d.get("enabled", True), "smoke.enabled")
    return SmokeSpec(
        enabled=True if enabled is None else enabled,
        seeds=c.int_list(d.get("seeds"), "smoke.seeds", 0) or default.seeds,
        draft_n_max=c.int_list(d.get("draft_n_max"), "smoke.draft_n_max", 1, 64) or default.draft_n_max,
        max_tokens=c.integer(d.get("max_tokens"), "smoke.max_tokens", 1, 100000) or default.max_tokens,
        prompts=c.integer(d.get("prompts"), "smoke.prompts", 1, 100000),
        raw=bool(c.boolean(d.get("raw"), "smoke.raw")),
        ctx=c.integer(d.get("ctx"), "smoke.ctx", 64, 1 << 22) or default.ctx,
        context_sweep=c.int_list(d.get("context_sweep"), "smoke.context_sweep", 64) or (),
        threads=c.integer(d.get("threads"), "smoke.threads", 1, 4096),
        gpu_layers=c.integer(d.get("gpu_layers"), "smoke.gpu_layers", 0, 100000),
        gates=_gates(c, d["gate"], "smoke.gate") if "gate" in d else Gates(),
        variant_gates=variant_gates,
    )


def _eval(c: _Checker, value: Any, base: Path) -> EvalSpec:
    if value is None:
        return EvalSpec()
    d = c.mapping(value, "eval", {"enabled": False, "text": False, "ctx": False, "chunks": False})
    if d is None:
        return EvalSpec()
    enabled = c.boolean(d.get("enabled", True), "eval.enabled")
    return EvalSpec(enabled=True if enabled is None else enabled,
                    text=c.path(d.get("text"), "eval.text", base) if "text" in d else None,
                    ctx=c.integer(d.get("ctx"), "eval.ctx", 16, 1 << 20) or 128,
                    chunks=c.integer(d.get("chunks"), "eval.chunks", 1, 100000) or 16)


def _fit(c: _Checker, value: Any) -> FitSpec:
    if value is None:
        return FitSpec()
    d = c.mapping(value, "fit", {"vram_gb": False, "ctx": False, "kv": False})
    if d is None:
        return FitSpec()
    vram = d.get("vram_gb")
    vram_t = FitSpec.vram_gb
    if vram is not None:
        if not isinstance(vram, list) or not vram:
            c.bad("fit.vram_gb", f"expected a list of GB sizes, got {_kind(vram)}")
        else:
            vals = [c.number(v, f"fit.vram_gb[{i}]", 1, 4096) for i, v in enumerate(vram)]
            vram_t = tuple(v for v in vals if v is not None)
    kv = d.get("kv")
    kv_t = FitSpec.kv
    if kv is not None:
        if not isinstance(kv, list):
            c.bad("fit.kv", f"expected a list of KV cache types, got {_kind(kv)}")
        else:
            kv_t = tuple(x for i, x in enumerate(kv)
                         if c.choice(x, f"fit.kv[{i}]", ("f16", "bf16", "q8_0", "q4_0"), "KV type", fold=False))
    return FitSpec(vram_t, c.int_list(d.get("ctx"), "fit.ctx", 64) or FitSpec.ctx, kv_t)


def _card(c: _Checker, value: Any) -> CardSpec:
    if value is None:
        return CardSpec()
    d = c.mapping(value, "card", {"license": False, "quantized_by": False, "base_model": False, "title": False})
    if d is None:
        return CardSpec()
    return CardSpec(license=c.string(d.get("license"), "card.license") or "other",
                    quantized_by=c.string(d.get("quantized_by"), "card.quantized_by"),
                    base_model=c.string(d.get("base_model"), "card.base_model", REPO_RE, "repo id (owner/name)"),
                    title=c.string(d.get("title"), "card.title"))


def _publish(c: _Checker, value: Any) -> PublishSpec:
    if value is None:
        return PublishSpec()
    d = c.mapping(value, "publish", {"repo": False, "private": False})
    if d is None:
        return PublishSpec()
    return PublishSpec(repo=c.string(d.get("repo"), "publish.repo", REPO_RE, "repo id (owner/name)"),
                       private=bool(c.boolean(d.get("private"), "publish.private")))


def _variants(c: _Checker, value: Any) -> tuple[Variant, ...]:
    if not isinstance(value, list) or not value:
        c.bad("variants", f"expected a non-empty list of variants, got {_kind(value)}",
              "e.g. variants: [{type: Q4_K_M}]")
        return ()
    out = []
    for i, item in enumerate(value):
        p = f"variants[{i}]"
        d = c.mapping(item, p, {"type": True, "policy": False, "label": False})
        if d is None:
            continue
        typ = c.choice(d.get("type"), f"{p}.type", VARIANT_TYPES, "quantization type") if "type" in d else None
        label = c.string(d.get("label"), f"{p}.label", NAME_RE, "label (letters, digits, . _ -)")
        rules = _rules(c, d.get("policy"), f"{p}.policy")
        if typ:
            out.append(Variant(typ, rules, label or ""))
    tags = [v.tag for v in out]
    for tag in sorted({t for t in tags if tags.count(t) > 1}):
        c.bad("variants", f"two variants would both write the {tag} file", "give one of them a distinct 'label'")
    return tuple(out)


TOP_LEVEL = {"name": True, "source": True, "expect": False, "mtp": False, "imatrix": False, "policy": False,
             "variants": True, "smoke": False, "eval": False, "fit": False, "card": False, "publish": False}


def parse(data: Any, file: Path) -> Recipe:
    """Validate a loaded YAML tree; raise RecipeError listing every problem."""
    c = _Checker(file)
    base = file.parent
    d = c.mapping(data, "", TOP_LEVEL) if data is not None else None
    if d is None:
        if data is None:
            c.bad("", "the recipe is empty")
        raise RecipeError(c.problems)
    name = c.string(d.get("name"), "name", NAME_RE, "name (letters, digits, . _ -; it becomes the file prefix)")
    source = _source(c, d["source"], base) if "source" in d else None
    e = c.mapping(d.get("expect", {}), "expect", {"arch": False, "main_layers": False, "nextn_layers": False,
                                                  "shape": False})
    expect = Expect(c.string(e.get("arch"), "expect.arch"), c.integer(e.get("main_layers"), "expect.main_layers", 1),
                    c.integer(e.get("nextn_layers"), "expect.nextn_layers", 0),
                    c.choice(e.get("shape"), "expect.shape", _presets(), "model shape", fold=False)
                    if "shape" in e else None) if e is not None else Expect()
    m = c.mapping(d.get("mtp", {}), "mtp", {"require": False})
    require = c.boolean(m.get("require", True), "mtp.require") if m is not None else True
    imatrix = _imatrix(c, d.get("imatrix"), base)
    policy = _rules(c, d.get("policy"), "policy")
    variants = _variants(c, d.get("variants"))
    smoke = _smoke(c, d.get("smoke"))
    ev = _eval(c, d.get("eval"), base)
    fit = _fit(c, d.get("fit"))
    card = _card(c, d.get("card"))
    publish = _publish(c, d.get("publish"))
    if c.problems or name is None or source is None:
        raise RecipeError(c.problems or [f"{file}: (top level): incomplete recipe"])  # pragma: no cover
    return Recipe(path=file, name=name, source=source, expect=expect, mtp_require=require is not False,
                  imatrix=imatrix, policy=policy, variants=variants, smoke=smoke, eval=ev, fit=fit, card=card,
                  publish=publish, raw=d)


def load(path: Path) -> Recipe:
    """Read and validate a recipe file (a path; never inline YAML text)."""
    path = Path(path).absolute()
    if not path.is_file():
        raise UsageError(f"{path}: recipe file not found", "give the path of a .yaml recipe, e.g. recipes/demo-tiny.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read recipe: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{path}: {where}invalid YAML: {problem}"]) from None
    return parse(data, path)
