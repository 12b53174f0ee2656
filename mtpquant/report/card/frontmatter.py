"""The card's Hub metadata (YAML front matter)."""

from __future__ import annotations

import yaml

BASE_TAGS = ("gguf", "mtp", "speculative-decoding")


def front_matter(ctx: dict) -> str:
    """Hub model-card metadata as YAML (dumped, never templated, so no name can break it)."""
    card = ctx["card"]
    types = list(dict.fromkeys(v["q"].need("type") for v in ctx["variants"]))
    data: dict = {}
    if ctx["base_model"]:
        data["base_model"] = ctx["base_model"]
        data["base_model_relation"] = "quantized"
    data["license"] = card.need("license")
    data["library_name"] = "gguf"
    data["tags"] = [*BASE_TAGS, *types]
    if card.get("quantized_by"):
        data["quantized_by"] = card["quantized_by"]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
