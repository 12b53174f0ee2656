"""Which runtimes can use an MTP GGUF's draft head: a dated statement with its sources, for the card."""

from __future__ import annotations

CHECKED = "2026-12-01, read from public issue trackers and docs"
ROWS = (
    {"name": "llama-server (llama.cpp)", "loads": "yes", "drafts": "yes, with --spec-type draft-mtp",
     "source": "llama.cpp PR #22673 (merged May 2026); the smoke runs above"},
    {"name": "llama-cli (llama.cpp)", "loads": "yes", "drafts": "no server-side speculative decoding",
     "source": "llama.cpp 515e85511 (--spec-type is a server option)"},
    {"name": "llama-cpp-python", "loads": "as its bundled llama.cpp allows", "drafts": "not exposed",
     "source": "JamePeng/llama-cpp-python issue #146 (feature request, 2026-07)"},
    {"name": "node-llama-cpp", "loads": "as its bundled llama.cpp allows", "drafts": "not yet (planned for v4)",
     "source": "withcatai/node-llama-cpp issue #642 (2026-08)"},
    {"name": "Ollama", "loads": "not verified here", "drafts": "no draft-mtp option found",
     "source": "no MTP issue or option found in its tracker as stored on the date above"},
)


def runtimes() -> dict:
    """The card's runtimes table: when it was checked and one row per runtime."""
    return {"checked": CHECKED, "rows": [dict(r) for r in ROWS]}
