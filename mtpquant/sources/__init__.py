"""Where a build's BF16 source comes from: one provider module per source kind (synthetic, local path, Hugging Face)."""
