"""What every command shares: the error map, signals, progress bars on stderr, common options, output."""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from tqdm import tqdm

from mtpquant.core.errors import Interrupted, MtpquantError, RecipeError
from mtpquant.llamacpp.toolchain import Toolchain, locate

INTERRUPTED = "interrupted; nothing half-written was kept"


def error_line(exc: MtpquantError) -> str:
    """The one line a user sees for a typed error (a recipe's problems are already `FILE: field: problem`)."""
    return exc.one_line() if isinstance(exc, (RecipeError, Interrupted)) else f"error: {exc.one_line()}"


def os_error_line(exc: OSError) -> str:
    """`<path>: <what the system said>` (and the second path of a rename or link)."""
    what = exc.strerror or str(exc)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    hint = {errno.ENOSPC: "free some space and run again", errno.EROFS: "choose a writable --out",
            errno.EACCES: "check the folder's permissions or choose another --out"}.get(exc.errno)
    return f"{' -> '.join(paths) + ': ' if paths else ''}{what}" + (f" ({hint})" if hint else "")


class Group(click.Group):
    """The one error map: typed errors become one line on stderr and their exit code; SIGTERM and SIGHUP unwind
    like Ctrl-C so every child process is stopped; unknown exceptions stay bugs with a traceback."""

    def invoke(self, ctx):
        with _signals_as_interrupt():
            try:
                return super().invoke(ctx)
            except MtpquantError as exc:
                click.echo(error_line(exc), err=True)
                ctx.exit(exc.exit_code)
            except KeyboardInterrupt:
                click.echo(ctx.meta.get("mtpquant.interrupted", INTERRUPTED), err=True)
                ctx.exit(130)
            except OSError as exc:  # the machine's state (a full or read-only disk, permissions), not a bug
                click.echo(f"error: {os_error_line(exc)}", err=True)
                ctx.exit(1)


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Bars:
    """tqdm bars on stderr, one per progress label; silent with --quiet."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(label)
        if bar is None:
            bar = self.bars[label] = tqdm(total=total, desc=label, file=sys.stderr, leave=False, disable=None,
                                          unit_scale=total > 10_000, dynamic_ncols=True)
        if total and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if total and done >= total:
            bar.close()
            self.bars.pop(label, None)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


@contextlib.contextmanager
def bars(quiet: bool) -> Iterator[Bars]:
    """Progress bars for the length of a command, closed however it ends."""
    b = Bars(not quiet)
    try:
        yield b
    finally:
        b.close()


def emit(data, as_json: bool, text: str) -> None:
    """JSON on stdout with --json, else the text."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def toolchain(llama_cpp: Path | None) -> Toolchain:
    return locate(llama_cpp)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


llama_cpp_option = click.option("--llama-cpp", "llama_cpp", type=click.Path(path_type=Path), default=None,
                                help="Folder with llama.cpp binaries (else $MTPQUANT_LLAMA_CPP, the cache, PATH).")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
