"""`mtpquant verify`: re-check a run directory from its files alone.

Artifacts against SHA256SUMS and their quantize receipts; every GGUF header against its receipt and the source
receipt (architecture, layer counts, weight count, NextN block); each measurement receipt against the artifact it
measured, with its figures re-derived from its own raw data where the receipt holds them; the card against a fresh
rendering from the receipts. With `rebuild`, llama-quantize runs again from the recorded source, tensor-type
overrides and imatrix, and the bytes are compared.
"""

from mtpquant.report.audit.rebuild import RebuildResult, rebuild_run
from mtpquant.report.audit.verify import VerifyReport, verify_run

__all__ = ["RebuildResult", "VerifyReport", "rebuild_run", "verify_run"]
