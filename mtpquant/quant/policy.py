"""Policy rules resolved against a tensor inventory into exact per-tensor overrides for llama-quantize."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mtpquant.modelfile.model import ModelInfo, TensorInfo
from mtpquant.recipe import Rule

# Target types llama-quantize refuses to produce without importance data (llama-quant.cpp tensor_requires_imatrix).
IMATRIX_REQUIRED = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})
NEVER_NEEDS_IMATRIX = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class Assignment:
    tensor: str
    type: str
    rule: str  # origin of the rule that chose it


def rule_matches(rule: Rule, tensor: TensorInfo, model: ModelInfo) -> bool:
    """Block role and regex (re.search over the full name, as llama.cpp applies its patterns)."""
    if rule.block == "nextn" and tensor.block not in model.nextn.blocks:
        return False
    if rule.block == "trunk" and (tensor.block is None or tensor.block >= model.n_layer):
        return False
    return rule.match is None or re.search(rule.match, tensor.name) is not None


def resolve(rules: tuple[Rule, ...], model: ModelInfo, quantizable: set[str],
            n_overrides: int = 0) -> tuple[list[Assignment], list[str]]:
    """First matching rule wins per quantizable tensor. Returns the assignments and one problem per rule that
    matches nothing (or only tensors llama-quantize never quantizes, or that an earlier rule took). The first
    `n_overrides` rules are a variant's own: a later rule whose every tensor one of them took is overridden, as
    the recipe asks, not a problem."""
    assignments: list[Assignment] = []
    used: dict[str, int] = {r.origin: 0 for r in rules}
    touched: dict[str, int] = {r.origin: 0 for r in rules}
    overridden: dict[str, int] = {r.origin: 0 for r in rules}
    for t in model.tensors:
        winner = None
        for i, r in enumerate(rules):
            if not rule_matches(r, t, model):
                continue
            touched[r.origin] += 1
            if t.name not in quantizable:
                continue
            if winner is None:
                winner = i
                used[r.origin] += 1
                assignments.append(Assignment(t.name, r.type, r.origin))
            elif winner < n_overrides <= i:
                overridden[r.origin] += 1
    problems = []
    for r in rules:
        if touched[r.origin] == 0:
            problems.append(f"{r.describe()}: matches no tensor of the source model")
        elif used[r.origin] == 0 and overridden[r.origin] == 0:
            problems.append(f"{r.describe()}: matches only tensors llama-quantize never quantizes "
                            "(norms, router gates, ...) or tensors an earlier rule already took")
    return assignments, problems


def needs_imatrix(tensor_name: str, ggml_type: str, ftype: str) -> bool:
    """Whether llama-quantize would refuse this tensor's target type without importance data."""
    if tensor_name.endswith(NEVER_NEEDS_IMATRIX) and tensor_name.split(".")[0] in ("token_embd", "output"):
        return False
    return ggml_type in IMATRIX_REQUIRED or (ftype == "Q2_K_S" and ggml_type == "Q2_K")


def override_line(tensor: str, ggml_type: str) -> str:
    """An anchored, escaped `NAME=TYPE` token for --tensor-type-file (llama.cpp lower-cases NAME)."""
    if tensor != tensor.lower():
        raise ValueError(f"tensor name {tensor!r} has upper-case letters, which llama-quantize's "
                         "lower-casing of patterns cannot match exactly")
    return f"^{re.escape(tensor)}$={ggml_type.lower()}"
