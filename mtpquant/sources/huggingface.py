"""A `source.hf` recipe: the revision pinned to a commit once, files verified, safetensors converted."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from mtpquant.core.errors import HubError
from mtpquant.core.files import cache_entries_for
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.rundir import RunDir
from mtpquant.hub.client import (
    SAFETENSORS,
    HubFile,
    HubSettings,
    Snapshot,
    download,
    is_cached,
    materialize,
    peek_gguf,
    resolve,
    select,
    settings,
    verify,
)
from mtpquant.recipe import Recipe
from mtpquant.sources import convert
from mtpquant.sources.base import Fetched, expect_problems, raise_problems

log = logging.getLogger(__name__)


def precheck_header(recipe: Recipe, header: dict, where: str) -> None:
    """Architecture, layer counts and MTP head of a GGUF header against `expect:` / `mtp:`."""
    nextn = int(header["nextn_layers"] or 0)
    main = int(header["block_count"]) - nextn if header["block_count"] is not None else None
    raise_problems(where, expect_problems(recipe, header["arch"], main, nextn))


def precheck_config(recipe: Recipe, config_path: Path, where: str) -> None:
    """Layer counts and MTP head from config.json against `expect:` / `mtp:`, before download and conversion."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HubError(f"{where}: config.json is not readable JSON ({exc})", "is this a checkpoint repo?") from None
    text = {**config, **(config.get("text_config") or {})}
    layers = text.get("num_hidden_layers")
    nextn = next((text[k] for k in ("mtp_num_hidden_layers", "num_nextn_predict_layers") if k in text), None)
    # the architecture is a llama.cpp name, known only after conversion; it is checked then
    raise_problems(f"{where} config.json", expect_problems(
        recipe, None, layers if isinstance(layers, int) else None, nextn if isinstance(nextn, int) else None,
        "mtp_num_hidden_layers"))


def _recorded(previous: dict, hf) -> dict | None:
    """The resolution this run already recorded (the previous provenance) for the same repo, revision and files."""
    if previous.get("kind") == "hf" and previous.get("repo") == hf.repo and previous.get("revision") == hf.revision \
            and previous.get("files_spec") == hf.files and previous.get("commit") and previous.get("hf_files"):
        return previous
    return None


def fetch_source(recipe: Recipe, run: RunDir, recorded: dict, progress: ProgressFn = no_progress) -> tuple[Path, dict]:
    """The recipe's `source.hf` as a verified local GGUF (first shard), converting safetensors; plus provenance."""
    hf = recipe.source.hf
    cfg = settings()
    previous = _recorded(recorded, hf)
    snap, fmt, files, resolved_at = _pin(recipe, previous, cfg, progress)
    here = dataclasses.replace(snap, endpoint=cfg.endpoint)  # where to download from now
    if fmt == SAFETENSORS:
        # config.json first: a checkpoint that cannot match the recipe is refused before the weights come
        config = download(here, tuple(f for f in files if f.name == "config.json"), cfg, progress, recipe.path)
        precheck_config(recipe, config["config.json"], snap.where)
    elif not previous and not is_cached(here, files[0], cfg) and (header := peek_gguf(here, files[0], cfg)):
        # the header first (byte ranges): a model that cannot match the recipe is refused before the download
        precheck_header(recipe, header, f"{snap.where} {files[0].name} (header)")
    paths = download(here, files, cfg, progress, recipe.path)
    verified = dict((previous or {}).get("hf_verified") or {})
    checked = verify(snap, files, paths, verified, progress)
    provenance = {
        "kind": "hf", "repo": hf.repo, "revision": hf.revision, "commit": snap.commit, "endpoint": snap.endpoint,
        "files_spec": hf.files, "format": fmt, "resolved_at": resolved_at, "commit_from_receipt": bool(previous),
        "hf_files": [f.to_json() for f in checked], "pre_tokenizer": hf.pre_tokenizer,
    }
    if fmt == SAFETENSORS:
        conversion = convert.convert_checkpoint(paths["config.json"].parent, {f.name: f.sha256 for f in checked},
                                                hf.repo.split("/")[1], pre_tokenizer=hf.pre_tokenizer,
                                                log_path=run.logs / "convert.log", progress=progress)
        path, provenance["conversion"], kept = conversion.path, conversion.provenance(), list(paths.values())
    else:
        linked = materialize(snap, checked, paths, verified)
        path, provenance["local_dir"] = linked[files[0].name], str(linked[files[0].name].parent)
        kept = [*paths.values(), *linked.values()]
    provenance["hf_verified"] = cache_entries_for(verified, kept)
    return path, provenance


def _pin(recipe: Recipe, previous: dict | None, cfg: HubSettings, progress: ProgressFn
         ) -> tuple[Snapshot, str, tuple[HubFile, ...], str | None]:
    """The commit and files to fetch: as this run recorded them, else resolved now (the revision, once)."""
    hf = recipe.source.hf
    if previous:
        # resolved once: later runs of this run directory keep the recorded commit and need no request at all
        snap = Snapshot(hf.repo, hf.revision, previous["commit"], previous.get("endpoint") or cfg.endpoint,
                        tuple(HubFile(d["name"], d["size"], d["sha256"], d.get("git_oid"), d.get("lfs", True))
                              for d in previous["hf_files"]))
        log.info("using commit %s of %s recorded for revision %s", snap.commit, hf.repo, hf.revision)
        return snap, previous.get("format", "gguf"), snap.files, previous.get("resolved_at")
    if cfg.offline:
        raise HubError(f"HF_HUB_OFFLINE is set and this run has not yet resolved {hf.repo}@{hf.revision}",
                       "run once online; re-runs of this run directory then use the Hugging Face cache")
    label = f"resolve {hf.repo}@{hf.revision}"
    progress(label, 0, 1)
    snap = resolve(hf.repo, hf.revision, cfg.endpoint, recipe.path)
    fmt, files = select(snap, hf.files, recipe.path)
    if fmt != SAFETENSORS and hf.pre_tokenizer:
        raise HubError(f"{recipe.path}: source.hf.pre_tokenizer: only used when converting safetensors, and "
                       f"{hf.files!r} is a GGUF", "remove it, or set source.hf.files: safetensors")
    progress(label, 1, 1)
    return snap, fmt, files, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class HuggingFace:
    kind = "hf"

    def fetch(self, recipe: Recipe, run: RunDir, previous: dict, progress: ProgressFn) -> Fetched:
        path, provenance = fetch_source(recipe, run, previous, progress)
        return Fetched(path, provenance, provenance.get("hf_verified") or {})

    def base_model(self, provenance: dict, named: str | None) -> tuple[str | None, str]:
        repo = provenance["repo"]
        line = f"`{repo}`, the repository the weights were taken from."
        if named and named != repo:
            line += f" The recipe names `{named}`; the card keeps the repository the receipts record."
        return repo, line


PROVIDER = HuggingFace()
