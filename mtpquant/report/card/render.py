"""The card rendered through one StrictUndefined Jinja template that refuses to print unescaped text, and written
beside the receipts it comes from."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, TemplateError, UndefinedError
from jinja2.runtime import Undefined

from mtpquant.core.errors import CardError, UsageError
from mtpquant.core.files import plain_json, write_text_atomic
from mtpquant.core.receipts import CardReceipt
from mtpquant.core.rundir import RunDir
from mtpquant.report.card.context import card_context
from mtpquant.report.card.inputs import card_inputs
from mtpquant.report.card.markdown import (
    Md,
    fmt_fig,
    fmt_num,
    fmt_pct,
    fmt_size,
    md_code,
    md_fence,
    md_json,
    md_sha,
    md_text,
)
from mtpquant.report.card.nodes import STALE_HINT, Node, ReceiptUndefined

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "templates"  # mtpquant/templates, shipped as package data
TEMPLATE = "model-card.md.j2"
CARD_FILE = "README.md"
FILTERS = {"text": md_text, "code": md_code, "fence": md_fence, "sha": md_sha, "num": fmt_num, "pct": fmt_pct,
           "size": fmt_size, "fig": fmt_fig, "json": md_json}


def _finalize(value):
    """Only escaped text and integers may be printed: a raw string or float in the template is a bug."""
    if type(value) is Undefined:  # the implicit else of `{{ x if cond }}` (the environment's own is strict)
        return ""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, Md):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise CardError(f"the card template printed a {type(value).__name__} ({str(value)[:60]!r}) without an "
                    "escaping filter")


class _CardEnvironment(Environment):
    """`receipt.field` means the field: a receipt key is never shadowed by a Python attribute of the Node."""

    NODE_METHODS = ("items", "keys", "values", "get")

    def getattr(self, obj, attribute):
        if isinstance(obj, Node):
            if attribute in obj:
                return obj[attribute]
            if attribute in self.NODE_METHODS:
                return getattr(obj, attribute)
            return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


def environment(template_dir: Path | None = None) -> Environment:
    """The card's Jinja environment: strict, receipt-aware, with the escaping filters."""
    env = _CardEnvironment(loader=FileSystemLoader(str(template_dir or TEMPLATE_DIR)), undefined=ReceiptUndefined,
                           autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                           finalize=_finalize)
    env.filters.update(FILTERS)
    return env


def render_context(ctx: dict, template_dir: Path | None = None) -> str:
    """The card for a context that card_context made."""
    template_dir = template_dir or TEMPLATE_DIR
    try:
        template = environment(template_dir).get_template(TEMPLATE)
    except TemplateError as exc:
        raise CardError(f"cannot load the card template {template_dir / TEMPLATE}: {exc}",
                        "is mtpquant installed with its templates/ folder?") from None
    try:
        return template.render(ctx)
    except UndefinedError as exc:
        raise CardError(str(exc), STALE_HINT) from None


def render_card(run: RunDir, inputs: dict | None = None, template_dir: Path | None = None) -> str:
    """The card for a run directory, from its receipts (and receipts/card.json, or `inputs` in its place)."""
    return render_context(card_context(run, inputs), template_dir)


def write_card(run: RunDir, recipe=None) -> Path:
    """Record the card's inputs in receipts/card.json (only if they changed), render, write README.md atomically."""
    run = RunDir(Path(run.root))
    if not run.receipts.is_dir():
        raise UsageError(f"{run.root}: not a run directory (no receipts/)", "run `mtpquant build` first")
    inputs = card_inputs(run, recipe)
    previous = run.read(CardReceipt, stale_ok=True)
    if previous is None or plain_json(previous.body()) != plain_json(inputs):
        run.write(CardReceipt(**inputs))
    text = render_card(run)
    target = run.root / CARD_FILE
    write_text_atomic(target, text)
    return target
