"""Where mtpquant's own files are: the data shipped in the package, and the per-user cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = PACKAGE_DIR / "data"
ENV_CACHE = "MTPQUANT_CACHE"


def cache_root() -> Path:
    """Where mtpquant keeps builds and downloads ($MTPQUANT_CACHE, else $XDG_CACHE_HOME/mtpquant)."""
    if env := os.environ.get(ENV_CACHE):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mtpquant"


def data_label(path: Path) -> str:
    """A shipped data file named relative to the package (`mtpquant/data/...`), never by a machine's folders."""
    return "mtpquant/" + Path(path).resolve().relative_to(PACKAGE_DIR).as_posix()
