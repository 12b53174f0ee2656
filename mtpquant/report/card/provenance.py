"""Where the files came from, as the card states it: base model, toolchain, quantize commands, pinned imatrix
files and the published repo, each taken from the receipts."""

from __future__ import annotations

import re
from pathlib import Path

from mtpquant.core.errors import CardError
from mtpquant.report.card.markdown import Md
from mtpquant.report.card.nodes import STALE_HINT, Node, plain
from mtpquant.sources.registry import provider


def base_model(source: Node, card: Node) -> tuple[str | None, Md]:
    """The Hub's base_model and the card's sentence about it, as the source's provider states them."""
    kind = source.need("kind")
    try:
        found = provider(kind)
    except KeyError:
        raise CardError(f"{source.where}: unknown source kind {kind!r}", STALE_HINT) from None
    try:
        name, line = found.base_model(plain(source.need("provenance")), card.get("base_model"))
    except KeyError as exc:  # a provenance field the provider needs: named as Node.need names it
        raise CardError(f"{source.where}: no field '{exc.args[0]}'", STALE_HINT) from None
    return name, Md(line)  # the providers' sentences are Markdown: code in backticks around validated names


def toolchain_facts(ident: Node) -> dict:
    """The llama.cpp build a receipt records (commit, flags, binaries), with None for what it does not."""
    binaries = ident.get("binaries") or {}
    flags = ident.get("cmake_flags")
    return {
        "commit": ident.get("llama_cpp_commit"),
        "package": ident.get("package"),
        "sdist_sha256": ident.get("sdist_sha256"),
        "cmake_flags": list(flags) if flags else None,
        "fp_contract": ident.get("fp_contract"),
        "compiler": ident.get("compiler"),
        "platform": "/".join(x for x in (ident.get("platform"), ident.get("machine")) if x) or None,
        "binaries": {k: v.get("sha256") for k, v in binaries.items()},
        "found_by": ident.get("source"),
        "cuda": None if flags is None else any(f.startswith("-DGGML_CUDA=ON") for f in flags),
    }


def display_command(q: Node, source: Node) -> list[str]:
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


def pinned_imatrix(variants: list[dict]) -> list[dict]:
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


def published(pub: Node | None) -> dict | None:
    """The repo and, for each artifact uploaded in shards, the shards (from receipts/publish.json)."""
    if pub is None:
        return None
    split = [{"file": name, "shards": a.need("shards")} for name, a in pub.need("artifacts").items()
             if a.need("shards")]
    return {"repo": pub.need("repo"), "limit": pub.need("split_max_size"), "split": split}
