"""The project's own model generator: small Qwen3.5/3.6-style checkpoints (MoE or dense) with a real NextN block,
optionally with a draft head designed to agree with the main model on a known share of tokens."""

from mtpquant.synth.generator import (
    ARCHES,
    CYCLE_CHARS,
    PRESETS,
    QWEN2_PRE_REGEX,
    Designed,
    SynthSpec,
    designed_agreement,
    designed_cycle,
    designed_draft_counts,
    designed_expected_acceptance,
    hf_config,
    token_id,
    write_gguf,
    write_hf,
)

__all__ = ["ARCHES", "CYCLE_CHARS", "PRESETS", "QWEN2_PRE_REGEX", "Designed", "SynthSpec", "designed_agreement", "designed_cycle",
           "designed_draft_counts", "designed_expected_acceptance", "hf_config", "token_id", "write_gguf",
           "write_hf"]
