"""What leaves a run directory: the model card rendered from receipts, `verify`, and `publish` to Hugging Face."""
