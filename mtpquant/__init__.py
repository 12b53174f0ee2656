"""mtpquant: GGUF quantizations that keep the MTP/NextN draft head, with receipts."""

__version__ = "0.1.0"
