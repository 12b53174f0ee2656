"""What decides an output's bytes: the keys a receipt stores so that the same inputs skip the step."""

from __future__ import annotations

from mtpquant.core.files import sha256_json
from mtpquant.llamacpp.toolchain import Toolchain


def toolchain_key(tc: Toolchain) -> dict:
    """What about the toolchain decides the bytes of an output."""
    ident = tc.describe()
    return {"llama_cpp_commit": ident.get("llama_cpp_commit", "unknown"),
            "llama_quantize_sha256": tc.binary_sha256("llama-quantize"),
            "cmake_flags": ident.get("cmake_flags")}


def quantize_key(source_sha256: str, variant_type: str, overrides: list[str], imatrix_sha256: str | None,
                 toolchain: dict) -> str:
    """What decides a variant's bytes; a receipt with the same key and output sha256 means nothing to redo."""
    return sha256_json({"source": source_sha256, "type": variant_type, "overrides": list(overrides),
                        "imatrix": imatrix_sha256, "toolchain": toolchain})
