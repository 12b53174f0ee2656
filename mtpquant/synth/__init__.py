"""The project's own model generator: small Qwen3.5/3.6-style checkpoints (MoE or dense) with a real NextN block,
optionally with a draft head designed to agree with the main model on a known share of tokens.

Modules, lowest first: tokenizer, spec (sizes and their checks), values (random streams, bf16 bits), designed (the
designed draft head), tensors (the tensor plan and each tensor's values), gguf_file and hf (the two file layouts).
"""

from mtpquant.synth.designed import (
    designed_agreement,
    designed_cycle,
    designed_draft_counts,
    designed_expected_acceptance,
)
from mtpquant.synth.gguf_file import shard_paths, write_gguf
from mtpquant.synth.hf import hf_config, write_hf
from mtpquant.synth.spec import ARCHES, CYCLE_CHARS, PRESETS, Designed, SynthSpec
from mtpquant.synth.tensors import PlannedTensor, tensor_plan
from mtpquant.synth.tokenizer import QWEN2_PRE_REGEX, token_id

__all__ = ["ARCHES", "CYCLE_CHARS", "PRESETS", "QWEN2_PRE_REGEX", "Designed", "PlannedTensor", "SynthSpec",
           "designed_agreement", "designed_cycle", "designed_draft_counts", "designed_expected_acceptance",
           "hf_config", "shard_paths", "tensor_plan", "token_id", "write_gguf", "write_hf"]
