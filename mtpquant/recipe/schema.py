"""The recipe as frozen dataclasses: what every later step reads. Defaults live here and nowhere else."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

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
# KV cache types llama-server takes for -ctk/-ctv, for recipes, `mtpquant fit --kv` and the estimate alike.
KV_TYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")
BLOCK_ROLES = ("nextn", "trunk")
HEAD_SCOPES = ("eh_proj", "nextn_block")  # draft_head.scope: nextn.eh_proj only, or every quantizable NextN tensor
HEAD_REFERENCES = ("Q8_0", "source")  # draft_head.reference: the head every candidate is compared against
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
class DraftHeadSpec:
    """The draft-head study: the types the NextN head's tensors are tried at (trunk unchanged), the head they are
    compared against, and how much MTP acceptance the chosen one may lose."""

    candidates: tuple[str, ...] = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")
    scope: str = "eh_proj"  # eh_proj | nextn_block
    reference: str = "Q8_0"  # Q8_0 | source (the source's own type, BF16 for a BF16 checkpoint)
    tolerance_pp: float = 1.0  # largest acceptable loss in percentage points, at the 95% upper bound
    k: int = 3  # --spec-draft-n-max of the acceptance measurement
    prompts: int | None = None  # the first N prompts of the suite (None: all)
    max_tokens: int = 64
    slots: int = 4  # llama-server slots answering requests concurrently (the counts do not depend on timing)
    threads: int | None = None  # llama-server threads (None: smoke.threads, else llama.cpp's default)
    unweighted: bool = False  # also measure each candidate quantized without the head's importance data


@dataclass(frozen=True)
class Variant:
    type: str
    rules: tuple[Rule, ...] = ()  # variant-specific rules, tried before the recipe's policy
    label: str = ""  # file-name tag; defaults to the type
    draft_head: DraftHeadSpec | None = None  # the study for this variant (the recipe's, with the variant's keys)

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
    """Smoke gates, each met only when the lower bound of its 95% CI clears it, at a k fixed in advance."""

    min_acceptance: float | None = None
    min_speedup: float | None = None
    k: int | None = None  # the draft length gated (None: the first of smoke.draft_n_max)


@dataclass(frozen=True)
class SmokeSpec:
    enabled: bool = False
    seeds: tuple[int, ...] = (42,)
    draft_n_max: tuple[int, ...] = (3,)
    max_tokens: int = 256  # short requests favour small k: the last k tokens of a request cannot draft fully
    prompts: int | None = None  # use the first N prompts of the suite (None: all)
    raw: bool = False  # also measure raw /completion prompts
    ctx: int = 4096
    context_sweep: tuple[int, ...] = ()  # context lengths (-c); each prompt fills its length less the output
    context_documents: int = 10  # documents per length from the stdlib's source (10 or more give a CI)
    context_k1: bool = False  # also measure draft-mtp at k=1 in the sweep
    long_documents: tuple[Path, ...] = ()  # the user's own documents for the sweep, instead of the stdlib's source
    threads: int | None = None
    gpu_layers: int | None = None
    # the same explicit placement for every server, so both arms run on the same machine state
    n_cpu_moe: int | None = None
    batch: int | None = None
    ubatch: int | None = None
    kv_type: str | None = None  # -ctk/-ctv of the main context (the draft context keeps llama.cpp's F16)
    flash_attn: str | None = None  # on | off | auto
    server_args: tuple[str, ...] = ()  # more llama-server flags, the same for every server
    warmup: int = 2  # full-length requests per server that are not counted
    reference: str | None = None  # source | <variant tag>: acceptance of a reference head on the same prompts
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
    draft_head: DraftHeadSpec | None = None  # the recipe-wide study settings; each variant carries its own
    raw: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def base_dir(self) -> Path:
        return self.path.parent
