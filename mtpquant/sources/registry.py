"""The source kinds a recipe can name, each a provider module, and the one source step that runs them."""

from __future__ import annotations

from mtpquant.core.files import cache_entries_for, cached_sha256
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import SourceReceipt
from mtpquant.core.rundir import RunDir
from mtpquant.modelfile.model import read_model
from mtpquant.recipe import Recipe
from mtpquant.sources import huggingface, local, synthetic
from mtpquant.sources.base import Provider, SourceModel, check

PROVIDERS: dict[str, Provider] = {p.kind: p for p in (synthetic.PROVIDER, local.PROVIDER, huggingface.PROVIDER)}


def provider(kind: str) -> Provider:
    return PROVIDERS[kind]


def prepare(recipe: Recipe, run: RunDir, progress: ProgressFn = no_progress) -> SourceModel:
    """Resolve the recipe's source to a GGUF on disk, hash it, read its header, check it against the recipe."""
    previous = run.read(SourceReceipt, stale_ok=True)
    cache = dict(previous.hash_cache) if previous else {}
    fetched = provider(recipe.source.kind).fetch(recipe, run, previous.provenance if previous else {}, progress)
    cache.update(fetched.known_sha256)
    info = read_model(fetched.path)
    files = _hash_files(info.paths, cache, progress)
    model = SourceModel(fetched.path, info, files, fetched.provenance)
    check(recipe, model)
    run.write(SourceReceipt(
        kind=recipe.source.kind, file=fetched.path.name, location=str(fetched.path), files=files, sha256=model.sha256, architecture=info.arch,
        block_count=info.block_count, main_layers=info.n_layer, nextn_predict_layers=info.nextn.layers,
        nextn_complete=info.nextn.complete, file_type=info.file_type_name, bytes=info.total_bytes,
        n_elements=info.n_elements, n_tensors=len(info.tensors), provenance=fetched.provenance,
        hash_cache=cache_entries_for(cache, info.paths)))
    return model


def _hash_files(paths, cache: dict, progress: ProgressFn) -> dict[str, str]:
    """sha256 per shard, reusing digests of files unchanged since they were hashed."""
    total = sum(p.stat().st_size for p in paths)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        progress("hash source", done, total)

    return {p.name: cached_sha256(p, cache, step) for p in paths}
