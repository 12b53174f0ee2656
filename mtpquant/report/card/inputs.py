"""receipts/card.json: what the card needs from outside the other receipts (the recipe's `card:` section, the
variant order, and text read from the GGUF such as the chat template), so the card can be rendered again anywhere."""

from __future__ import annotations

from pathlib import Path

from mtpquant import recipe as rcp
from mtpquant.core.errors import CardError
from mtpquant.core.files import sha256_bytes, sha256_file
from mtpquant.core.receipts import CardReceipt, QuantizeReceipt
from mtpquant.core.rundir import RunDir
from mtpquant.modelfile.header import field_value, read_header

CARD_STEP = CardReceipt.KIND


def card_inputs(run: RunDir, recipe=None) -> dict:
    """What receipts/card.json records: the recipe's card section and variant order, and text from the GGUF."""
    if recipe is None:
        recipe = _recipe_of(run)
    if recipe is None:
        previous = run.read(CardReceipt)
        if previous is None:
            raise CardError(f"{run.root}: no receipts/card.json and no recipe to take the card settings from",
                            "give the recipe: `mtpquant card RUN_DIR --recipe FILE`")
        return previous.body()
    receipts = {p.stem.removeprefix("quantize-"): p for p in sorted(run.receipts.glob("quantize-*.json"))}
    order = [v.tag for v in recipe.variants if v.tag in receipts]
    if not order:
        raise CardError(f"{run.root}: no quantize receipt for any variant of {recipe.path.name}",
                        "run `mtpquant build` first")
    first = run.read(QuantizeReceipt, order[0])
    return {
        "name": recipe.name,
        "title": recipe.card.title,
        "license": recipe.card.license,
        "quantized_by": recipe.card.quantized_by,
        "base_model": recipe.card.base_model,
        "recipe": {"file": recipe.path.name, "sha256": sha256_file(recipe.path)},
        "variants": order,
        "server_defaults": {"ctx": recipe.smoke.ctx, "draft_n_max": recipe.smoke.draft_n_max[0]},
        "gguf": gguf_text(run.root / first.file),
    }


def _recipe_of(run: RunDir):
    """The recipe that built the run (manifest.json names it), if it is still there and unchanged."""
    manifest = run.read_manifest()
    path = manifest.get("recipe")
    if not path or not Path(path).is_file():
        return None
    if manifest.get("recipe_sha256") and sha256_file(Path(path)) != manifest["recipe_sha256"]:
        if run.read(CardReceipt) is not None:
            return None  # the card's inputs were recorded when it was built; keep them
        raise CardError(f"{path} changed since this run was built (manifest.json records sha256 "
                        f"{manifest['recipe_sha256']})", "pass the recipe explicitly with --recipe to use it anyway")
    return rcp.load(Path(path))


def gguf_text(path: Path) -> dict:
    """The free text a card shows from a GGUF's metadata (read from the header only)."""
    reader = read_header(path)
    template = field_value(reader, "tokenizer.chat_template")
    return {
        "file": path.name,
        "general_name": field_value(reader, "general.name"),
        "chat_template": template if isinstance(template, str) else None,
        "chat_template_sha256": sha256_bytes(template.encode()) if isinstance(template, str) else None,
    }
