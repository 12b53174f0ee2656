"""Hugging Face Hub I/O through huggingface_hub: pinned revisions, verified downloads, one error explainer."""
