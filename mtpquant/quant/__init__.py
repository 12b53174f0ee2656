"""Quantization planning and checking: policy rules, per-variant type plans proven by dry runs, imatrix coverage,
verification of an output against its plan."""
