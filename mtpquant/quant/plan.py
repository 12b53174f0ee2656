"""Per-variant type plans: llama-quantize --dry-run for the defaults, the policy for the overrides,
a second dry run to prove llama-quantize will honour them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mtpquant.core.errors import PlanError
from mtpquant.core.files import write_text_atomic
from mtpquant.llamacpp.quantize import dry_run
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.modelfile.header import n_elements, type_bytes
from mtpquant.modelfile.model import ModelInfo
from mtpquant.quant.policy import Assignment, needs_imatrix, override_line, resolve
from mtpquant.recipe import Rule, Variant


@dataclass(frozen=True)
class TensorPlan:
    name: str
    source_type: str
    shape: tuple[int, ...]
    default_type: str  # what llama-quantize picks for this ftype with no overrides
    type: str  # what it will write
    rule: str | None  # recipe field path of the rule (or "imatrix.uncovered") that set it
    needs_imatrix: bool
    bytes: int


@dataclass(frozen=True)
class VariantPlan:
    variant: Variant
    file_name: str
    tensors: tuple[TensorPlan, ...]
    overrides: tuple[str, ...]  # lines of the --tensor-type-file
    pins: tuple[str, ...] = ()  # tensors pinned because the imatrix has no statistics for them
    uncovered: tuple[str, ...] = ()  # quantized without importance data (allowed for their type)
    notes: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(1, sum(n_elements(t.shape) for t in self.tensors))

    def types(self) -> dict[str, str]:
        return {t.name: t.type for t in self.tensors}

    def needing_imatrix(self) -> list[str]:
        return [t.name for t in self.tensors if t.needs_imatrix]

    def to_json(self) -> dict:
        return {
            "variant": self.variant.tag,
            "type": self.variant.type,
            "file": self.file_name,
            "bytes": self.total_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "overrides": list(self.overrides),
            "pins": list(self.pins),
            "uncovered": list(self.uncovered),
            "needs_imatrix": self.needing_imatrix(),
            "notes": list(self.notes),
            "tensors": [{"name": t.name, "source_type": t.source_type, "shape": list(t.shape),
                         "default_type": t.default_type, "type": t.type, "rule": t.rule,
                         "needs_imatrix": t.needs_imatrix, "bytes": t.bytes} for t in self.tensors],
        }


def plan_variant(tc: Toolchain, source: Path, model: ModelInfo, variant: Variant, policy: tuple[Rule, ...],
                 file_name: str, work: Path, covered: set[str] | None, uncovered_policy: str, pin_type: str,
                 imatrix: Path | None = None, imatrix_origin: str = "imatrix.uncovered") -> VariantPlan:
    """Resolve one variant: defaults, rule overrides, imatrix pins; then prove them with a second dry run.

    `covered` is the set of weights the imatrix has (or will have) statistics for; None means no imatrix.
    `imatrix` is given to the dry runs (the real file, or a placeholder with the predicted coverage).
    """
    tag = variant.tag
    defaults = dry_run(tc, source, variant.type, work / f"dryrun-{tag}-defaults.log", imatrix=imatrix)
    quantizable = {name for name, (_, target) in defaults.items() if target is not None}
    assignments, problems = resolve(variant.rules + policy, model, quantizable, len(variant.rules))
    if problems:
        raise PlanError(f"variant {tag}: " + "; ".join(problems),
                        "fix the rule's regex or block; `mtpquant inspect SOURCE` lists the tensor names")
    chosen: dict[str, Assignment] = {a.tensor: a for a in assignments}
    final_types = {name: (chosen[name].type if name in chosen else target or src)
                   for name, (src, target) in defaults.items()}
    pins, uncovered, missing = [], [], []
    for name in quantizable:
        if name.startswith(("token_embd.", "output.")):
            continue
        has_data = covered is not None and name in covered
        if has_data:
            continue
        if needs_imatrix(name, final_types[name], variant.type):
            if uncovered_policy == "pin":
                chosen[name] = Assignment(name, pin_type, imatrix_origin)
                final_types[name] = pin_type
                pins.append(name)
            else:
                missing.append(name)
        elif covered is not None:
            uncovered.append(name)
    if missing:
        shown = ", ".join(sorted(missing)[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        why = "there is no imatrix" if covered is None else "the imatrix has no statistics for them"
        raise PlanError(f"variant {tag}: {len(missing)} tensor(s) planned as {_types_of(missing, final_types)} need "
                        f"importance data but {why}: {shown}",
                        "collect them (imatrix.compute.nextn: true, for the NextN block) or set "
                        "imatrix.uncovered: pin (with imatrix.pin_type) to give them an imatrix-free type")
    overrides = tuple(override_line(a.tensor, a.type) for a in sorted(chosen.values(), key=lambda a: a.tensor))
    tensors_file = work / f"{tag}.tensor-types.txt"
    write_text_atomic(tensors_file, "\n".join(overrides) + ("\n" if overrides else ""))
    honoured = dry_run(tc, source, variant.type, work / f"dryrun-{tag}.log", overrides_file=tensors_file,
                       imatrix=imatrix) if overrides else defaults
    wrote = {n: target or src for n, (src, target) in honoured.items()}  # copied unchanged: the source's type
    wrong = [f"{n} -> {wrote.get(n)} (asked {chosen[n].type} by {chosen[n].rule})"
             for n in chosen if wrote.get(n) != chosen[n].type]
    if wrong:
        raise PlanError(f"variant {tag}: llama-quantize would not write the planned type for "
                        f"{len(wrong)} tensor(s): " + "; ".join(wrong[:5]),
                        "K- and IQ-types need rows that are a multiple of 256; pick a 32-block type such as Q8_0")
    tensors = []
    for t in model.tensors:
        src, default_target = defaults[t.name]
        final = honoured[t.name][1] or src
        rule = chosen[t.name].rule if t.name in chosen else None
        tensors.append(TensorPlan(t.name, t.type, t.shape, default_target or src, final, rule,
                                  needs_imatrix(t.name, final, variant.type) if t.name in quantizable else False,
                                  type_bytes(t.shape, final)))
    return VariantPlan(variant, file_name, tuple(tensors), overrides, tuple(sorted(pins)), tuple(sorted(uncovered)))


def _types_of(names: list[str], types: dict[str, str]) -> str:
    return "/".join(sorted({types[n] for n in names}))
