"""The pinned llama.cpp: building and finding its binaries, and running llama-quantize, -imatrix, -perplexity and
-server from argv lists."""
