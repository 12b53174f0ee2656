"""Typed errors. The library raises these; only the CLI turns them into one line and an exit code."""

from __future__ import annotations

from pathlib import Path


class MtpquantError(Exception):
    """A failure the user can act on: `message` says what and where, `hint` what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MtpquantError):
    """Bad input given on the command line or in a file the user named."""

    exit_code = 2


class RecipeError(UsageError):
    """Every problem found in a recipe, each already formatted as `FILE: field.path: problem (hint)`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def one_line(self) -> str:
        return self.message


class ReceiptError(MtpquantError):
    """A receipt that cannot be read as its kind: unreadable, of another kind or version, or missing fields."""


class GGUFReadError(UsageError):
    """A file that is not a readable GGUF (missing, truncated, corrupt, not GGUF)."""


class ToolchainError(MtpquantError):
    """llama.cpp binaries missing, too old, or failing to build."""


class ToolError(MtpquantError):
    """An external program failed: carries the command, how it ended and the tail of its log."""

    def __init__(self, argv: list[str], how: str, log_path: Path | None, tail: str, hint: str | None = None):
        self.argv = list(argv)
        self.how = how
        self.log_path = log_path
        self.tail = tail
        where = f"; log: {log_path}" if log_path else ""
        last = _last_meaningful_line(tail)
        detail = f": {last}" if last else ""
        super().__init__(f"{Path(argv[0]).name} {how}{detail}{where}", hint)


class Interrupted(MtpquantError):
    """Ctrl-C, SIGTERM or SIGHUP during a step; the message says what was kept and how to resume."""

    exit_code = 130


class VerifyError(MtpquantError):
    """An artifact does not match its plan, receipt or checksum."""


class GateError(MtpquantError):
    """A measured figure fell below a gate set in the recipe."""


class ServerError(MtpquantError):
    """llama-server did not start or did not answer."""


class HubError(MtpquantError):
    """The hub could not give what the recipe names: repo, revision, access, files or a connection."""


class IntegrityError(VerifyError):
    """A downloaded file's bytes differ from what the hub says the commit holds."""

    def __init__(self, file: str, where: str, what: str, expected: str, got: str, hint: str | None = None):
        self.file, self.what, self.expected, self.got = file, what, expected, got
        super().__init__(f"{file} from {where}: {what} mismatch: expected {expected}, got {got}", hint)


class PublishError(MtpquantError):
    """The hub refused or could not be reached while publishing; the message says whether anything was sent."""


class CardError(MtpquantError):
    """The card cannot be rendered: a receipt lacks a value the card shows, or its inputs cannot be found."""


class ConvertError(MtpquantError):
    """The converter failed, or its output is not what the checkpoint promised."""


class CoverageError(MtpquantError):
    """The imatrix lacks statistics that the plan relies on."""


class PlanError(MtpquantError):
    """The policy cannot be carried out exactly on this source."""


class EvalError(MtpquantError):
    """llama-perplexity ran but did not give the statistics asked for."""


def _last_meaningful_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not set(line) <= set("=-* "):
            return line
    return ""
