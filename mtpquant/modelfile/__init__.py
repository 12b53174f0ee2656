"""GGUF files read from their headers: models (split too) and imatrix files, never their tensor data."""
