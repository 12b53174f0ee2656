"""llama-perplexity: its argv, the environment it runs in, and the KLD/PPL statistics parsed from its stdout.

llama-perplexity prints everything, the statistics too, through llama.cpp's asynchronous logger (common/log.cpp):
LOG() only queues a message, a worker thread writes it to stdout, and the tool returns from main without
`common_log_flush` while `common_log_main` leaks the logger on purpose, so exit kills the worker with the tail of the
queue unwritten. Exit code 0, statistics gone: on a loaded machine more than half the runs. `perplexity_env`
therefore preloads a small library (`LOG_DRAIN_C`, built once with the system C compiler, `cc`) whose
atexit handler calls the tool's own `common_log_pause`, which lets the worker write every queued line and joins it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mtpquant.core.errors import EvalError
from mtpquant.core.paths import cache_root
from mtpquant.core.procs import ToolRun, capture, run_tool
from mtpquant.llamacpp.toolchain import Toolchain

STATS_HEADER = "====== Perplexity statistics ======"
KLD_HEADER = "====== KL divergence statistics ======"

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf))"
_PM = rf"{_NUM}\s*±\s*{_NUM}"
PATTERNS = {
    "ppl_q": re.compile(rf"^Mean PPL\(Q\)\s*:\s*{_PM}", re.MULTILINE),
    "ppl_base": re.compile(rf"^Mean PPL\(base\)\s*:\s*{_PM}", re.MULTILINE),
    "ln_ppl_ratio": re.compile(rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_PM}", re.MULTILINE),
    "ppl_ratio": re.compile(rf"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_PM}", re.MULTILINE),
    "kld_mean": re.compile(rf"^Mean\s+KLD:\s*{_PM}", re.MULTILINE),
    "same_top_pct": re.compile(rf"^Same top p:\s*{_PM}\s*%", re.MULTILINE),
}
SINGLE = {
    "kld_max": re.compile(rf"^Maximum KLD:\s*{_NUM}", re.MULTILINE),
    "kld_p99": re.compile(rf"^99\.0%\s+KLD:\s*{_NUM}", re.MULTILINE),
    "kld_median": re.compile(rf"^Median\s+KLD:\s*{_NUM}", re.MULTILINE),
    "rms_dp_pct": re.compile(rf"^RMS Δp\s*:\s*{_NUM}", re.MULTILINE),
}
CHUNK_ROW = re.compile(r"^\s*\d+\s+[-+\d.naif]+\s+±", re.MULTILINE)
FINAL_RE = re.compile(rf"Final estimate: PPL = {_NUM} \+/- {_NUM}")


def perplexity_argv(tc: Toolchain, model: Path, text: Path, ctx: int, chunks: int, base_kld: Path,
                    compare: bool, threads: int | None = None) -> list:
    """llama-perplexity argv; `-b` equals `-c` so one sequence fills each batch."""
    argv: list = [tc.tool("llama-perplexity"), "-m", model, "-f", text, "-c", str(ctx), "-b", str(ctx),
                  "--chunks", str(chunks), "--kl-divergence-base", base_kld]
    if compare:
        argv.append("--kl-divergence")
    if threads:
        argv += ["-t", str(threads)]
    return argv


# The symbols are those of the static llama.cpp binaries (not exported, so looked up in /proc/self/exe's .symtab);
# where they are absent (a stripped binary) the library does nothing.
LOG_DRAIN_C = r"""
#define _GNU_SOURCE
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void *(*log_main)(void);
static void (*log_pause)(void *);

static int main_base(struct dl_phdr_info *info, size_t size, void *data) {
    (void) size;
    *(ElfW(Addr) *) data = info->dlpi_addr; /* the first object is the program */
    return 1;
}

static void drain(void) { log_pause(log_main()); }

__attribute__((constructor)) static void find(void) {
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) return;
    if (fstat(fd, &st) != 0 || (size_t) st.st_size < sizeof(ElfW(Ehdr))) { close(fd); return; }
    const unsigned char *m = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return;
    const size_t size = st.st_size;
    const ElfW(Ehdr) *eh = (const void *) m;
    ElfW(Addr) a_main = 0, a_pause = 0;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_shoff && eh->e_shentsize == sizeof(ElfW(Shdr)) &&
        eh->e_shoff + (size_t) eh->e_shnum * sizeof(ElfW(Shdr)) <= size) {
        const ElfW(Shdr) *sh = (const void *) (m + eh->e_shoff);
        for (int i = 0; i < eh->e_shnum; i++) {
            if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
            const ElfW(Shdr) *str = &sh[sh[i].sh_link];
            if (sh[i].sh_offset + sh[i].sh_size > size || str->sh_offset + str->sh_size > size) continue;
            const ElfW(Sym) *sym = (const void *) (m + sh[i].sh_offset);
            for (size_t k = 0; k < sh[i].sh_size / sizeof(ElfW(Sym)); k++) {
                if (ELF64_ST_TYPE(sym[k].st_info) != STT_FUNC || !sym[k].st_value || sym[k].st_name >= str->sh_size)
                    continue;
                const char *name = (const char *) (m + str->sh_offset + sym[k].st_name);
                if (strcmp(name, "_Z15common_log_mainv") == 0) a_main = sym[k].st_value;
                if (strcmp(name, "_Z16common_log_pauseP10common_log") == 0) a_pause = sym[k].st_value;
            }
        }
    }
    munmap((void *) m, size);
    if (!a_main || !a_pause) return;
    ElfW(Addr) base = 0;
    dl_iterate_phdr(main_base, &base);
    log_main = (void *(*)(void)) (base + a_main);
    log_pause = (void (*)(void *)) (base + a_pause);
    atexit(drain);
}
"""
_DRAIN_UNBUILDABLE: set[Path] = set()


def log_drain_library() -> Path | None:
    """The preload library that drains llama.cpp's log queue at exit, built into the cache on first use; None off
    Linux, without a C compiler, or where the cache path cannot go into LD_PRELOAD (a space or colon in it)."""
    if not sys.platform.startswith("linux"):
        return None
    lib = cache_root() / "preload" / f"logdrain-{hashlib.sha256(LOG_DRAIN_C.encode()).hexdigest()[:16]}.so"
    if " " in str(lib) or ":" in str(lib) or lib in _DRAIN_UNBUILDABLE:
        return None
    if lib.is_file():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / "logdrain.c", Path(tmp) / "logdrain.so"
            src.write_text(LOG_DRAIN_C)
            code, _ = capture([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)]) if cc else (None, "")
            if code != 0 or not out.is_file():
                _DRAIN_UNBUILDABLE.add(lib)
                return None
            os.replace(out, lib)  # atomic: a concurrent build of the same source writes the same bytes
    except OSError:
        _DRAIN_UNBUILDABLE.add(lib)
        return None
    return lib


def perplexity_env() -> dict[str, str]:
    """The environment for llama-perplexity: `log_drain_library` preloaded, and OpenMP threads that sleep instead
    of spinning once idle.

    Without the library the end of the output (the statistics) is lost when the log thread has not written it by
    exit: on a loaded 2-core machine 61 runs in 100 lost it with `passive`, 22 in 50 with the default policy.
    """
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
    if lib := log_drain_library():
        env["LD_PRELOAD"] = " ".join(p for p in (str(lib), os.environ.get("LD_PRELOAD", "")) if p)
    return env


def run_perplexity(argv: Sequence, log: Path, on_line: Callable[[str], None] | None = None) -> ToolRun:
    """Run a llama-perplexity argv in `perplexity_env`, logging to `log`; ToolError if it fails."""
    return run_tool(list(argv), log_path=log, on_line=on_line, env=perplexity_env())


def shown_argv(argv: Sequence) -> list[str]:
    """The argv as receipts show it: the binary's name instead of its path."""
    return [Path(str(argv[0])).name, *(str(a) for a in argv[1:])]


def scored_tokens(ctx: int, chunks: int) -> int:
    """Tokens llama-perplexity scores in KLD mode: the second half of each chunk, less the last position."""
    return chunks * (ctx - 1 - ctx // 2)


def parse_final_ppl(output: str) -> float | None:
    """The `Final estimate: PPL = ...` of a run, None if it printed none."""
    m = FINAL_RE.search(output)
    return float(m.group(1)) if m else None


def parse_kld_output(stdout: str, log: Path | None = None) -> dict:
    """The statistics of `llama-perplexity --kl-divergence`; EvalError naming the log if they are absent."""
    where = f"; log: {log}" if log else ""
    if STATS_HEADER not in stdout or KLD_HEADER not in stdout:
        rows = len(CHUNK_ROW.findall(stdout))
        raise EvalError(f"llama-perplexity printed no '{STATS_HEADER}' section ({rows} chunk row(s)){where}")
    out: dict = {}
    missing = []
    for key, rx in PATTERNS.items():
        m = rx.search(stdout)
        if not m:
            missing.append(key)
            continue
        out[key], out[key + "_err"] = float(m.group(1)), float(m.group(2))
    for key, rx in SINGLE.items():
        m = rx.search(stdout)
        out[key] = float(m.group(1)) if m else None
    if missing:
        raise EvalError(f"llama-perplexity statistics lack {', '.join(missing)}{where}",
                        "its output was cut short; run the step again")
    out["same_top_share"] = round(out.pop("same_top_pct") / 100.0, 6)
    out["same_top_share_err"] = round(out.pop("same_top_pct_err") / 100.0, 6)
    out["chunks_evaluated"] = len(CHUNK_ROW.findall(stdout))
    return out
