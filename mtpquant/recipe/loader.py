"""Reading a recipe file: YAML (duplicate keys refused) into the validated Recipe, every problem reported at once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from mtpquant.core.errors import RecipeError, UsageError
from mtpquant.recipe.checker import Checker, kind_of
from mtpquant.recipe.schema import (
    BLOCK_ROLES,
    HEAD_REFERENCES,
    HEAD_SCOPES,
    KV_TYPES,
    NAME_RE,
    REPO_RE,
    SHA_RE,
    TENSOR_TYPES,
    VARIANT_TYPES,
    CardSpec,
    DraftHeadSpec,
    EvalSpec,
    Expect,
    FitSpec,
    Gates,
    HfSource,
    HubFileRef,
    ImatrixSpec,
    PublishSpec,
    Recipe,
    Rule,
    SmokeSpec,
    Source,
    Variant,
)
from mtpquant.synth import PRESETS


def _rules(c: Checker, value: Any, path: str) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        c.bad(path, f"expected a list of rules, got {kind_of(value)}")
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


def _source(c: Checker, value: Any, base: Path) -> Source | None:
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
            c.bad("source.synthetic", f"expected a mapping of generator options, got {kind_of(syn)}")
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


def _imatrix(c: Checker, value: Any, base: Path) -> ImatrixSpec:
    d = c.section(value, "imatrix", {"file": False, "compute": False, "uncovered": False, "pin_type": False})
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
    corpus = c.path(f.get("corpus"), "imatrix.compute.corpus", base, text=True)
    chunks = c.integer(f.get("chunks", 64), "imatrix.compute.chunks", 1, 100000)
    ctx = c.integer(f.get("ctx", 512), "imatrix.compute.ctx", 32, 1 << 20)
    nextn = c.boolean(f.get("nextn", True), "imatrix.compute.nextn")
    return ImatrixSpec("compute", corpus=corpus, chunks=chunks or 64, ctx=ctx or 512,
                       nextn=True if nextn is None else nextn, uncovered=uncovered, pin_type=pin)


def _gates(c: Checker, value: Any, path: str) -> Gates:
    d = c.mapping(value, path, {"min_acceptance": False, "min_speedup": False, "k": False})
    if d is None:
        return Gates()
    return Gates(c.number(d.get("min_acceptance"), f"{path}.min_acceptance", 0.0, 1.0),
                 c.number(d.get("min_speedup"), f"{path}.min_speedup", 0.0, 100.0),
                 c.integer(d.get("k"), f"{path}.k", 1, 64))


# Flags mtpquant sets itself, identically for both arms: a recipe may not set them through server_args.
OWN_SERVER_FLAGS = ("-m", "--model", "--host", "--port", "-c", "--ctx-size", "-np", "--parallel", "-t", "--threads",
                    "-ngl", "--gpu-layers", "--n-gpu-layers", "-ncmoe", "--n-cpu-moe", "-b", "--batch-size", "-ub",
                    "--ubatch-size", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-fa", "--flash-attn",
                    "-fit", "--fit", "--metrics", "--spec-type", "--spec-draft-n-max", "--spec-draft-n-min")


def _server_args(c: Checker, value: Any) -> tuple[str, ...]:
    """Extra llama-server flags, the same on every server: strings, flags first, none that mtpquant sets itself."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
        c.bad("smoke.server_args", f"expected a list of strings, got {kind_of(value)}", "e.g. [--mlock]")
        return ()
    if not value[0].startswith("-"):
        c.bad("smoke.server_args[0]", f"{value[0]!r} is not a flag", "each argument list starts with a --flag")
    for i, a in enumerate(value):
        if a.split("=", 1)[0] in OWN_SERVER_FLAGS:
            c.bad(f"smoke.server_args[{i}]", f"{a} is set by mtpquant itself, the same for both arms",
                  "use the smoke field for it (threads, gpu_layers, n_cpu_moe, batch, ubatch, kv_type, flash_attn)")
    return tuple(value)


def _long_documents(c: Checker, value: Any, base: Path) -> tuple[Path, ...]:
    """The user's own long documents for the context sweep: existing files, each named once."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        c.bad("smoke.long_documents", f"expected a non-empty list of file paths, got {kind_of(value)}",
              "e.g. long_documents: [docs/manual.txt]")
        return ()
    paths = [c.path(v, f"smoke.long_documents[{i}]", base, text=True) for i, v in enumerate(value)]
    if len({p for p in paths if p is not None}) < len([p for p in paths if p is not None]):
        c.bad("smoke.long_documents", "names a file twice", "each document is measured once per length")
    return tuple(p for p in paths if p is not None)


def _smoke(c: Checker, value: Any, base: Path) -> SmokeSpec:
    d = c.section(value, "smoke", {"enabled": False, "seeds": False, "draft_n_max": False, "max_tokens": False,
                                   "prompts": False, "raw": False, "ctx": False, "context_sweep": False,
                                   "threads": False, "gpu_layers": False, "gate": False, "variant_gates": False,
                                   "n_cpu_moe": False, "batch": False, "ubatch": False, "kv_type": False,
                                   "flash_attn": False, "server_args": False, "warmup": False, "reference": False,
                                   "context_documents": False, "context_k1": False, "long_documents": False})
    if d is None:
        return SmokeSpec()
    default = SmokeSpec()
    variant_gates = {}
    vg = d.get("variant_gates")
    if vg is not None:
        if not isinstance(vg, dict):
            c.bad("smoke.variant_gates", f"expected a mapping of variant tag -> gate, got {kind_of(vg)}")
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
        context_documents=c.integer(d.get("context_documents"), "smoke.context_documents", 1, 1000)
        or default.context_documents,
        context_k1=bool(c.boolean(d.get("context_k1"), "smoke.context_k1")),
        long_documents=_long_documents(c, d.get("long_documents"), base),
        threads=c.integer(d.get("threads"), "smoke.threads", 1, 4096),
        gpu_layers=c.integer(d.get("gpu_layers"), "smoke.gpu_layers", 0, 100000),
        n_cpu_moe=c.integer(d.get("n_cpu_moe"), "smoke.n_cpu_moe", 0, 100000),
        batch=c.integer(d.get("batch"), "smoke.batch", 1, 1 << 20),
        ubatch=c.integer(d.get("ubatch"), "smoke.ubatch", 1, 1 << 20),
        kv_type=c.choice(d.get("kv_type"), "smoke.kv_type", KV_TYPES, "KV type", fold=False) if "kv_type" in d else None,
        flash_attn=c.choice(d.get("flash_attn"), "smoke.flash_attn", ("on", "off", "auto"), "setting", fold=False)
        if "flash_attn" in d else None,
        server_args=_server_args(c, d.get("server_args")),
        warmup=c.integer(d.get("warmup"), "smoke.warmup", 2, 100) or default.warmup,
        reference=c.string(d.get("reference"), "smoke.reference"),
        gates=_gates(c, d["gate"], "smoke.gate") if "gate" in d else Gates(),
        variant_gates=variant_gates,
    )


def _eval(c: Checker, value: Any, base: Path) -> EvalSpec:
    d = c.section(value, "eval", {"enabled": False, "text": False, "ctx": False, "chunks": False})
    if d is None:
        return EvalSpec()
    enabled = c.boolean(d.get("enabled", True), "eval.enabled")
    return EvalSpec(enabled=True if enabled is None else enabled,
                    text=c.path(d.get("text"), "eval.text", base, text=True) if "text" in d else None,
                    ctx=c.integer(d.get("ctx"), "eval.ctx", 16, 1 << 20) or 128,
                    chunks=c.integer(d.get("chunks"), "eval.chunks", 1, 100000) or 16)


def _fit(c: Checker, value: Any) -> FitSpec:
    d = c.section(value, "fit", {"vram_gb": False, "ctx": False, "kv": False})
    if d is None:
        return FitSpec()
    vram = d.get("vram_gb")
    vram_t = FitSpec.vram_gb
    if vram is not None:
        if not isinstance(vram, list) or not vram:
            c.bad("fit.vram_gb", f"expected a list of GB sizes, got {kind_of(vram)}")
        else:
            vals = [c.number(v, f"fit.vram_gb[{i}]", 1, 4096) for i, v in enumerate(vram)]
            vram_t = tuple(v for v in vals if v is not None)
    kv = d.get("kv")
    kv_t = FitSpec.kv
    if kv is not None:
        if not isinstance(kv, list):
            c.bad("fit.kv", f"expected a list of KV cache types, got {kind_of(kv)}")
        else:
            kv_t = tuple(x for i, x in enumerate(kv)
                         if c.choice(x, f"fit.kv[{i}]", KV_TYPES, "KV type", fold=False))
    return FitSpec(vram_t, c.int_list(d.get("ctx"), "fit.ctx", 64) or FitSpec.ctx, kv_t)


def _card(c: Checker, value: Any) -> CardSpec:
    d = c.section(value, "card", {"license": False, "quantized_by": False, "base_model": False, "title": False})
    if d is None:
        return CardSpec()
    return CardSpec(license=c.string(d.get("license"), "card.license") or "other",
                    quantized_by=c.string(d.get("quantized_by"), "card.quantized_by"),
                    base_model=c.string(d.get("base_model"), "card.base_model", REPO_RE, "repo id (owner/name)"),
                    title=c.string(d.get("title"), "card.title"))


def _publish(c: Checker, value: Any) -> PublishSpec:
    d = c.section(value, "publish", {"repo": False, "private": False})
    if d is None:
        return PublishSpec()
    return PublishSpec(repo=c.string(d.get("repo"), "publish.repo", REPO_RE, "repo id (owner/name)"),
                       private=bool(c.boolean(d.get("private"), "publish.private")))


HEAD_FIELDS = {"candidates": False, "scope": False, "reference": False, "tolerance_pp": False, "k": False,
               "prompts": False, "max_tokens": False, "slots": False, "threads": False, "unweighted": False}


def _draft_head(c: Checker, value: Any, path: str, base: DraftHeadSpec | None) -> DraftHeadSpec | None:
    """`draft_head` over `base` (the recipe's settings for a variant, else the defaults); false: no study."""
    if value is False:
        return None
    d = c.mapping(value, path, HEAD_FIELDS)
    if d is None:
        return None
    spec = base or DraftHeadSpec()
    got: dict[str, Any] = {}
    if "candidates" in d:
        cands = d["candidates"]
        if not isinstance(cands, list) or not cands:
            c.bad(f"{path}.candidates", f"expected a non-empty list of tensor types, got {kind_of(cands)}",
                  "e.g. [Q4_K, Q5_K, Q6_K, Q8_0]")
        else:
            types = [c.choice(t, f"{path}.candidates[{i}]", TENSOR_TYPES, "tensor type") for i, t in enumerate(cands)]
            if len(set(types)) != len(types) and all(types):
                c.bad(f"{path}.candidates", "has duplicates")
            elif all(types):
                got["candidates"] = tuple(types)
    if "scope" in d:
        got["scope"] = c.choice(d["scope"], f"{path}.scope", HEAD_SCOPES, "draft-head scope", fold=False)
    if "reference" in d:
        got["reference"] = c.choice(d["reference"], f"{path}.reference", HEAD_REFERENCES, "reference head",
                                    fold=False)
    if "tolerance_pp" in d:
        got["tolerance_pp"] = c.number(d["tolerance_pp"], f"{path}.tolerance_pp", 0.0, 100.0)
    for key, lo, hi in (("k", 1, 64), ("prompts", 2, 100000), ("max_tokens", 2, 100000), ("slots", 1, 256),
                        ("threads", 1, 4096)):
        if key in d:
            got[key] = c.integer(d[key], f"{path}.{key}", lo, hi)
    if "unweighted" in d:
        got["unweighted"] = c.boolean(d["unweighted"], f"{path}.unweighted")
    spec = replace(spec, **{k: v for k, v in got.items() if v is not None})
    if spec.max_tokens <= spec.k:
        c.bad(f"{path}.max_tokens", f"{spec.max_tokens} tokens leave no room for drafts of k={spec.k}",
              "give more tokens than the draft length")
    return spec


def _variants(c: Checker, value: Any, head: DraftHeadSpec | None = None) -> tuple[Variant, ...]:
    if not isinstance(value, list) or not value:
        c.bad("variants", f"expected a non-empty list of variants, got {kind_of(value)}",
              "e.g. variants: [{type: Q4_K_M}]")
        return ()
    out = []
    for i, item in enumerate(value):
        p = f"variants[{i}]"
        d = c.mapping(item, p, {"type": True, "policy": False, "label": False, "draft_head": False})
        if d is None:
            continue
        typ = c.choice(d.get("type"), f"{p}.type", VARIANT_TYPES, "quantization type") if "type" in d else None
        label = c.string(d.get("label"), f"{p}.label", NAME_RE, "label (letters, digits, . _ -)")
        rules = _rules(c, d.get("policy"), f"{p}.policy")
        if typ:
            vhead = _draft_head(c, d["draft_head"], f"{p}.draft_head", head) if "draft_head" in d else head
            out.append(Variant(typ, rules, label or "", vhead))
    tags = [v.tag for v in out]
    for tag in sorted({t for t in tags if tags.count(t) > 1}):
        c.bad("variants", f"two variants would both write the {tag} file", "give one of them a distinct 'label'")
    return tuple(out)


TOP_LEVEL = {"name": True, "source": True, "expect": False, "mtp": False, "imatrix": False, "policy": False,
             "variants": True, "smoke": False, "eval": False, "fit": False, "card": False, "publish": False,
             "draft_head": False}


def parse(data: Any, file: Path) -> Recipe:
    """Validate a loaded YAML tree; raise RecipeError listing every problem."""
    c = Checker(file)
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
                    c.choice(e.get("shape"), "expect.shape", tuple(PRESETS), "model shape", fold=False)
                    if "shape" in e else None) if e is not None else Expect()
    m = c.mapping(d.get("mtp", {}), "mtp", {"require": False})
    require = c.boolean(m.get("require", True), "mtp.require") if m is not None else True
    imatrix = _imatrix(c, d.get("imatrix"), base)
    policy = _rules(c, d.get("policy"), "policy")
    head = _draft_head(c, d["draft_head"], "draft_head", None) if "draft_head" in d else None
    variants = _variants(c, d.get("variants"), head)
    smoke = _smoke(c, d.get("smoke"), base)
    ev = _eval(c, d.get("eval"), base)
    fit = _fit(c, d.get("fit"))
    if smoke.context_sweep:  # the fit estimates memory at the lengths the sweep measures (and the recipe's own)
        given = fit.ctx if isinstance(d.get("fit"), dict) and "ctx" in d["fit"] else ()
        fit = replace(fit, ctx=tuple(sorted(set(given) | set(smoke.context_sweep))))
    card = _card(c, d.get("card"))
    publish = _publish(c, d.get("publish"))
    if c.problems or name is None or source is None:
        raise RecipeError(c.problems or [f"{file}: (top level): incomplete recipe"])  # pragma: no cover
    return Recipe(path=file, name=name, source=source, expect=expect, mtp_require=require is not False,
                  imatrix=imatrix, policy=policy, variants=variants, smoke=smoke, eval=ev, fit=fit, card=card,
                  publish=publish, draft_head=head, raw=d)


def load(path: Path) -> Recipe:
    """Read and validate a recipe file (a path; never inline YAML text)."""
    path = Path(path).absolute()
    if not path.exists():
        raise UsageError(f"{path}: recipe file not found", "give the path of a .yaml recipe, e.g. recipes/demo-tiny.yaml")
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file", "give the path of a .yaml recipe, e.g. recipes/demo-tiny.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})", "save the recipe as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read recipe: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{path}: {where}invalid YAML: {problem}"]) from None
    return parse(data, path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)
