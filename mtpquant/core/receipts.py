"""Receipts: one frozen dataclass per kind, each with its own version, read and written through one path.

A receipt is `receipts/<kind>[-<variant>].json`: an envelope (`step`, `version`, `variant`, `mtpquant`,
`written_at`) and the kind's fields. The step that writes a kind, the card, `verify` and `publish` all read it as
the same class. A version is bumped whenever a field's meaning changes; a receipt of an older version is never
read as if the new code had written it: the build measures again, and readers say so in one line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

from mtpquant import __version__
from mtpquant.core.errors import ReceiptError
from mtpquant.core.files import write_json_atomic

ENVELOPE = ("step", "version", "variant", "mtpquant", "written_at")
R = TypeVar("R", bound="Receipt")


@dataclass(frozen=True)
class Receipt:
    """The envelope every kind shares; subclasses add their fields and set KIND and VERSION."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def body(self) -> dict:
        """The kind's fields as JSON-able values, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def outputs(self) -> dict[str, str]:
        """Files of the run directory this receipt vouches for: name -> sha256 (a step is skipped only while
        they are intact)."""
        return {}

    @classmethod
    def from_body(cls: type[R], body: dict, where: str) -> R:
        names = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in names.items() if n not in body and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        unknown = sorted(set(body) - set(names))
        if missing or unknown:
            what = "; ".join(filter(None, [f"lacks {', '.join(missing)}" if missing else "",
                                           f"has unknown field(s) {', '.join(unknown)}" if unknown else ""]))
            raise ReceiptError(f"{where}: {what}", "it was not written by this mtpquant; rerun the step (--force)")
        return cls(**{k: v for k, v in body.items() if k in names})


def file_name(kind: str, variant: str | None) -> str:
    """receipts/ file name of a kind (and variant)."""
    return f"{kind}-{variant}.json" if variant else f"{kind}.json"


def write(folder: Path, receipt: Receipt, variant: str | None = None) -> Path:
    """receipts/<kind>[-<variant>].json, written whole or not at all."""
    path = folder / file_name(receipt.KIND, variant)
    envelope = {"step": receipt.KIND, "version": receipt.VERSION, "variant": variant, "mtpquant": __version__,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(path, {**envelope, **receipt.body()})
    return path


def load_json(path: Path) -> dict | None:
    """A receipt file as JSON, None if absent; one line if it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ReceiptError(f"{path}: unreadable receipt ({exc})", "delete it, or rerun with --force") from None
    if not isinstance(data, dict):
        raise ReceiptError(f"{path}: a receipt is a JSON object", "delete it, or rerun with --force")
    return data


def read(folder: Path, cls: type[R], variant: str | None = None, *, stale_ok: bool = False) -> R | None:
    """The receipt of this kind (and variant), or None when there is none.

    An older version raises ReceiptError (a reader must not take it for current); with `stale_ok` it reads as
    None instead, which is how a build decides to redo the step.
    """
    path = folder / file_name(cls.KIND, variant)
    data = load_json(path)
    if data is None:
        return None
    version = data.get("version")
    if data.get("step") != cls.KIND:
        raise ReceiptError(f"{path}: a {data.get('step')!r} receipt where a {cls.KIND!r} one belongs",
                           "delete it, or rerun with --force")
    if version != cls.VERSION:
        if stale_ok and (not isinstance(version, int) or version < cls.VERSION):
            return None
        older = not isinstance(version, int) or version < cls.VERSION
        raise ReceiptError(f"{path}: version {version} of the {cls.KIND!r} receipt, this mtpquant reads version "
                           f"{cls.VERSION}", "rebuild the run (mtpquant build) to measure it again" if older
                           else "use the mtpquant that wrote it, or a newer one")
    return cls.from_body({k: v for k, v in data.items() if k not in ENVELOPE}, str(path))


# ----------------------------------------------------------------------------------------------- the kinds


@dataclass(frozen=True)
class SourceReceipt(Receipt):
    """Where the BF16 source came from and what it is (receipts/source.json)."""

    KIND: ClassVar[str] = "source"
    kind: str  # the provider: synthetic | path | hf
    file: str
    location: str  # where the tools were given it on the machine that built the run
    files: dict  # shard name -> sha256
    sha256: str
    architecture: str
    block_count: int
    main_layers: int
    nextn_predict_layers: int
    nextn_complete: bool
    file_type: str | None
    bytes: int
    n_elements: int
    n_tensors: int
    provenance: dict  # the provider's own record (spec, repo and commit, path, conversion, ...)
    hash_cache: dict = field(default_factory=dict)  # core.files.stat_key -> sha256, to skip re-hashing


@dataclass(frozen=True)
class ImatrixSourceReceipt(Receipt):
    """A pinned imatrix fetched from the Hub and copied into the run (receipts/imatrix-source.json)."""

    KIND: ClassVar[str] = "imatrix-source"
    repo: str
    revision: str
    commit: str
    path: str
    endpoint: str
    file: str


@dataclass(frozen=True)
class ImatrixReceipt(Receipt):
    """A computed importance matrix (receipts/imatrix.json)."""

    KIND: ClassVar[str] = "imatrix"
    input_key: str
    file: str
    sha256: str
    corpus: str  # a stable name (the file name), never a machine's folders
    corpus_sha256: str
    chunks: int
    ctx: int
    nextn: bool
    seconds: float
    datasets: list
    chunk_count: int
    entries: int
    n_layer_nextn: int | None
    nextn_entries: list
    command: list  # the single pass, or the merge of `parts`
    toolchain: dict
    # a map-reduce over chunk ranges: each part's chunks, command, worker and sha256 (empty for a single pass)
    parts: list = field(default_factory=list)
    merge: dict | None = None  # how the parts were merged, and how that compares with a single pass

    def outputs(self) -> dict[str, str]:
        return {self.file: self.sha256}


@dataclass(frozen=True)
class QuantizeReceipt(Receipt):
    """One verified variant (receipts/quantize-<VARIANT>.json)."""

    KIND: ClassVar[str] = "quantize"
    input_key: str
    file: str
    sha256: str
    bytes: int
    tensor_bytes: int
    bits_per_weight: float
    type: str
    file_type: int
    file_type_name: str
    source_sha256: str
    imatrix_sha256: str | None
    overrides: list
    pins: list
    uncovered: list
    draft_head: str
    nextn_blocks: list
    nextn_types: dict
    type_counts: dict
    checks: dict
    command: list
    cwd: str
    seconds: float
    toolchain: dict

    def outputs(self) -> dict[str, str]:
        return {self.file: self.sha256}


@dataclass(frozen=True)
class FitReceipt(Receipt):
    """Which GPU sizes and contexts a variant fits (receipts/fit-<VARIANT>.json)."""

    KIND: ClassVar[str] = "fit"
    VERSION: ClassVar[int] = 2  # 2: the MTP draft context's KV cache at F16 (-ctkd), no V cache for MLA models
    input_key: str
    file: str
    file_bytes: int
    model: dict
    mtp: bool
    settings: dict
    weights: dict
    needs: list
    rows: list
    method: str


@dataclass(frozen=True)
class EvalReceipt(Receipt):
    """KLD and perplexity of a variant against its source (receipts/eval-<VARIANT>.json)."""

    KIND: ClassVar[str] = "eval"
    input_key: str
    file: str
    variant_sha256: str | None
    source: str
    source_sha256: str | None
    text: dict
    ctx: int
    batch: int
    chunks: int
    stats: dict  # llama-perplexity's statistics: ppl_q, kld_mean, same_top_share, ... (and their errors)
    runs: int
    base_logits: dict
    base_reused: bool
    commands: dict
    env: dict
    log: str


@dataclass(frozen=True)
class SmokeReceipt(Receipt):
    """MTP off vs on in llama-server for one variant (receipts/smoke-<VARIANT>.json)."""

    KIND: ClassVar[str] = "smoke"
    # 2: the bootstrap resamples prompts (greedy seeds are replicates); 3: the method of measure/smoke/__init__.py
    VERSION: ClassVar[int] = 3
    input_key: str
    model: dict
    toolchain: dict
    machine: dict
    suite: dict
    settings: dict
    servers: list
    placement: dict
    order: dict
    drift: dict
    split: dict
    requests: list
    runs: list
    results: dict
    best_k: int | None
    headline: dict | None
    notes: list
    seconds: float
    gates: dict = field(default_factory=dict)
    chat_vs_raw: dict | None = None
    context_sweep: dict | None = None
    reference: dict | None = None  # acceptance against a reference head (smoke.reference), paired per prompt
    concurrent: dict | None = None  # the executor's record: where it ran, on which CPUs, and what else ran meanwhile


@dataclass(frozen=True)
class DraftHeadReceipt(Receipt):
    """The draft-head study of one variant (receipts/draft-head-<VARIANT>.json): each candidate head quantized with
    the trunk unchanged, its MTP acceptance paired per prompt with the reference head's, and the type chosen."""

    KIND: ClassVar[str] = "draft-head"
    input_key: str
    variant_type: str
    settings: dict  # candidates, scope, reference, tolerance_pp, k, prompts, max_tokens, slots
    scope_tensors: list  # the head's tensors that take the candidate type
    made: dict  # how the candidates were made: the rules, the trunk check, what was kept
    imatrix: dict  # the imatrix's sha256 and the path the head took (collected | pinned | unweighted | no imatrix)
    measurement: dict  # the acceptance-only method: server settings, prompts, suite, bootstrap
    reference: dict  # the reference head: its type and measured arm
    candidates: list  # every candidate: file, bytes, acceptance, paired loss with CI, whether it qualifies, seconds
    choice: dict  # outcome (chosen | tie | none), type, why, and the policy rule the variant was planned with
    toolchain: dict
    seconds: float
    unweighted: dict | None = None  # the candidates again without the head's importance data, when asked


@dataclass(frozen=True)
class CardReceipt(Receipt):
    """What the card needs from outside the other receipts (receipts/card.json)."""

    KIND: ClassVar[str] = "card"
    name: str
    title: str | None
    license: str
    quantized_by: str | None
    base_model: str | None
    recipe: dict
    variants: list
    server_defaults: dict
    gguf: dict


@dataclass(frozen=True)
class PublishReceipt(Receipt):
    """What the last publish sent where (receipts/publish.json): every artifact whole or as shards."""

    KIND: ClassVar[str] = "publish"
    repo: str
    split_max_size: int
    artifacts: dict
    files: list
    card: str


KINDS: dict[str, type[Receipt]] = {c.KIND: c for c in (SourceReceipt, ImatrixSourceReceipt, ImatrixReceipt,
                                                      QuantizeReceipt, FitReceipt, EvalReceipt, SmokeReceipt,
                                                      DraftHeadReceipt, CardReceipt, PublishReceipt)}


def read_file(path: Path) -> tuple[Receipt, dict]:
    """Any receipt file, read as the kind its envelope names: (the typed receipt, the envelope)."""
    data = load_json(path)
    if data is None:
        raise ReceiptError(f"{path}: no such receipt")
    cls = KINDS.get(data.get("step"))
    if cls is None:
        raise ReceiptError(f"{path}: unknown receipt kind {data.get('step')!r}", "it was not written by mtpquant")
    receipt = read(path.parent, cls, data.get("variant"))
    if receipt is None or file_name(cls.KIND, data.get("variant")) != path.name:
        raise ReceiptError(f"{path}: its envelope names another file ({file_name(cls.KIND, data.get('variant'))})",
                           "receipt files are not to be renamed; rebuild the run")
    return receipt, {k: data.get(k) for k in ENVELOPE}
