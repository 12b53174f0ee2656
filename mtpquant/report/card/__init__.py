"""The model card: rendered from a run directory's receipts only, through one StrictUndefined Jinja template.

Every value the card shows comes from `receipts/*.json`. The card step adds one receipt of its own,
`receipts/card.json`: what the card needs from outside the other receipts (the recipe's `card:` section, the
variant order, and text read from the GGUF such as the chat template), so that anyone holding the published
files can render the card again and compare (`mtpquant verify`).

Text from a recipe or a GGUF is data: it reaches the Markdown only through the escaping filters (markdown.py),
and the template environment (render.py) refuses to print any string that did not pass through one of them.
"""

from mtpquant.report.card.context import card_context
from mtpquant.report.card.frontmatter import front_matter
from mtpquant.report.card.inputs import CARD_STEP, card_inputs, gguf_text
from mtpquant.report.card.markdown import (
    Md,
    fmt_fig,
    fmt_num,
    fmt_pct,
    fmt_size,
    md_code,
    md_fence,
    md_sha,
    md_text,
    shell_command,
)
from mtpquant.report.card.nodes import Node, load_receipts, plain, receipt_sha256s
from mtpquant.report.card.render import (
    CARD_FILE,
    TEMPLATE,
    TEMPLATE_DIR,
    environment,
    render_card,
    render_context,
    write_card,
)

__all__ = ["CARD_FILE", "CARD_STEP", "TEMPLATE", "TEMPLATE_DIR", "Md", "Node", "card_context",
           "card_inputs", "environment", "fmt_fig", "fmt_num", "fmt_pct", "fmt_size", "front_matter", "gguf_text",
           "load_receipts", "md_code", "md_fence", "md_sha", "md_text", "plain", "receipt_sha256s", "render_card",
           "render_context", "shell_command", "write_card"]
