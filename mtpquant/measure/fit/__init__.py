"""Which file fits which GPU: memory per (GPU size, context, KV type), estimated offline from a GGUF header.

hparams: what the estimate reads from the metadata; estimate: the memory llama-server needs, part by part (its
docstring says how each part is estimated and how it was checked against llama.cpp); table: the verdicts per GPU
size, the receipts of a run, the table as text.
"""

from mtpquant.measure.fit.estimate import Need, ServerSettings
from mtpquant.measure.fit.table import (
    KV_TYPES,
    fit_from_plan,
    fit_from_tensors,
    fit_run,
    fit_table,
    format_table,
    verdict,
)

# What other layers use (tests also use Need, verdict and fit_from_tensors).
__all__ = ["KV_TYPES", "Need", "ServerSettings", "fit_from_plan", "fit_from_tensors", "fit_run", "fit_table",
           "format_table", "verdict"]
