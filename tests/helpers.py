"""Small helpers shared by test modules."""

import time
from collections.abc import Callable
from pathlib import Path

from mtpquant import recipe as rcp
from mtpquant.core.rundir import RunDir
from mtpquant.pipeline import build as pipeline

SMALL_RECIPE = "name: small\nsource: {synthetic: {seed: 3}}\nvariants: [{type: Q8_0}]\n"


def gone_within(busy: Callable[[], bool], grace: float = 10) -> bool:
    """True once `busy()` turns false within `grace` seconds, polling every 50 ms; False if it never does."""
    deadline = time.monotonic() + grace
    while busy():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def build_small_run(folder: Path, toolchain) -> RunDir:
    """Build SMALL_RECIPE (one Q8_0 variant of a synthetic model) into folder/out and return its RunDir."""
    (folder / "r.yaml").write_text(SMALL_RECIPE)
    pipeline.build(rcp.load(folder / "r.yaml"), folder / "out", toolchain)
    return RunDir((folder / "out").resolve())


def flip_byte(path: Path, offset: int) -> None:
    """Invert the lowest bit of one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def receipt_json(run, kind: str, variant: str | None = None) -> dict | None:
    """A receipt as the JSON on disk (envelope and fields), for assertions; None if there is none."""
    from mtpquant.core.receipts import file_name, load_json

    return load_json(run.receipts / file_name(kind, variant))


def quantize_receipt(file: str, sha256: str = "0" * 64, **fields):
    """A QuantizeReceipt naming `file`, the other fields filled with placeholders (for run directories made by hand)."""
    from mtpquant.core.receipts import QuantizeReceipt

    base = dict(input_key="", file=file, sha256=sha256, bytes=0, tensor_bytes=0, bits_per_weight=0.0, type="Q4_K_M",
                file_type=15, file_type_name="Q4_K_M", source_sha256="", imatrix_sha256=None, overrides=[], pins=[],
                uncovered=[], draft_head="no imatrix", nextn_blocks=[], nextn_types={}, type_counts={}, checks={},
                command=[], cwd="", seconds=0.0, toolchain={})
    return QuantizeReceipt(**{**base, **fields})


def source_receipt(file: str, sha256: str, location: str, **fields):
    """A SourceReceipt for a local source file, the other fields filled with placeholders."""
    from mtpquant.core.receipts import SourceReceipt

    base = dict(kind="path", file=file, location=location, files={file: sha256}, sha256=sha256,
                architecture="qwen35moe", block_count=3, main_layers=2, nextn_predict_layers=1, nextn_complete=True,
                file_type="BF16", bytes=0, n_elements=0, n_tensors=0, provenance={"kind": "path", "path": location})
    return SourceReceipt(**{**base, **fields})
