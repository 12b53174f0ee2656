"""What every source provider shares: the SourceModel a build works on, the interface a provider implements, and
the checks of a source against the recipe's `expect:` and `mtp:`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mtpquant.core.errors import MtpquantError
from mtpquant.core.files import sha256_json
from mtpquant.core.progress import ProgressFn
from mtpquant.core.rundir import RunDir
from mtpquant.modelfile.model import ModelInfo
from mtpquant.recipe import Recipe

QUANTIZABLE_SOURCE_TYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class SourceModel:
    path: Path  # the file llama.cpp tools are given (first shard of a split model)
    info: ModelInfo
    files: dict  # file name -> sha256, every shard
    provenance: dict  # what the receipt and card say about where it came from

    @property
    def sha256(self) -> str:
        """One digest for the whole source (its shards' digests in order)."""
        if len(self.files) == 1:
            return next(iter(self.files.values()))
        return sha256_json(sorted(self.files.items()))


@dataclass(frozen=True)
class Fetched:
    """What a provider hands back: the GGUF to read (first shard), its provenance, and sha256s it already knows."""

    path: Path
    provenance: dict
    known_sha256: dict  # hash-cache entries (core.files.stat_key -> sha256) the provider proved on the way


class Provider(Protocol):
    """One source kind (the key under `source:` in a recipe). A new kind is a new module with one of these,
    listed in mtpquant.sources.registry."""

    kind: str

    def fetch(self, recipe: Recipe, run: RunDir, previous: dict, progress: ProgressFn) -> Fetched:
        """The recipe's source as a local BF16/F16 GGUF; `previous` is the run's last source receipt (or {})."""

    def base_model(self, provenance: dict, named: str | None) -> tuple[str | None, str]:
        """The Hub's `base_model` for the card, and a plain sentence saying where it comes from."""


def expect_problems(recipe: Recipe, arch: str | None, main_layers: int | None, nextn_layers: int | None,
                    nextn_field: str | None = None) -> list[str]:
    """What about a source's architecture and layer counts contradicts `expect:` and `mtp.require` (None: unknown,
    not checked). Shared by the local check and the early checks of Hugging Face headers and configs."""
    e, problems = recipe.expect, []
    if recipe.mtp_require and nextn_layers == 0:
        problems.append(f"has no NextN/MTP block ({nextn_field or f'{arch}.nextn_predict_layers'} is absent or 0)")
    if e.arch and arch is not None and e.arch != arch:
        problems.append(f"architecture is {arch}, the recipe expects {e.arch}")
    if e.main_layers is not None and main_layers is not None and e.main_layers != main_layers:
        problems.append(f"has {main_layers} main layers, the recipe expects {e.main_layers}")
    if e.nextn_layers is not None and nextn_layers is not None and e.nextn_layers != nextn_layers:
        problems.append(f"has {nextn_layers} NextN layer(s), the recipe expects {e.nextn_layers}")
    return problems


def raise_problems(where: str, problems: list[str]) -> None:
    if problems:
        hint = "mtp.require: false builds without a draft head" if "NextN" in problems[0] else \
            "check the recipe's source and expect fields"
        raise MtpquantError(f"source {where}: " + "; ".join(problems), hint)


def check(recipe: Recipe, model: SourceModel) -> None:
    """The source matches what the recipe expects: sha256 pin, MTP block, architecture, layer counts, type."""
    info = model.info
    problems = []
    if recipe.source.sha256 and recipe.source.sha256 != model.sha256:
        problems.append(f"sha256 is {model.sha256}, the recipe pins {recipe.source.sha256}")
    problems += expect_problems(recipe, info.arch, info.n_layer, info.nextn.layers)
    if recipe.mtp_require and info.nextn.layers and not info.nextn.complete:
        problems.append(f"NextN block incomplete, missing {', '.join(info.nextn.missing[:6])}")
    quantized = sorted({t.type for t in info.tensors if len(t.shape) >= 2} - set(QUANTIZABLE_SOURCE_TYPES))
    if quantized:
        problems.append(f"is already quantized ({', '.join(quantized)}); llama-quantize refuses to requantize")
    raise_problems(model.path.name, problems)
