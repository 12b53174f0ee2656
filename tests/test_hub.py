"""Hugging Face sources through the real huggingface_hub client, against the loopback hub of tests/hubserver.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml
from hubserver import HubServer

from mtpquant import recipe as rc
from mtpquant import synth
from mtpquant.core.errors import HubError, IntegrityError, MtpquantError
from mtpquant.core.rundir import RunDir
from mtpquant.hub import client as hubm
from mtpquant.modelfile.model import read_model
from mtpquant.pipeline import build as pipeline
from mtpquant.sources import registry as source
from mtpquant.sources.base import SourceModel

REPO = "mtpquant-test/tiny-mtp-GGUF"
HF_REPO = "mtpquant-test/tiny-mtp"
TOKEN = "hf_loopback_token"
SPEC = synth.SynthSpec(name="tiny-mtp", seed=11)
README = b"---\nlicense: apache-2.0\n---\n# tiny-mtp\n"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> dict:
    """One synthetic model written both ways: split BF16 GGUF shards and the safetensors layout."""
    d = tmp_path_factory.mktemp("synthetic")
    shards = synth.write_gguf(d / "gguf" / "tiny-mtp-BF16.gguf", SPEC, split_max_tensors=24)
    return {"shards": shards, "hf": synth.write_hf(d / "hf", SPEC)}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A started loopback hub; huggingface_hub pointed at it with an empty cache, online, without a token."""
    server = HubServer(tmp_path / "hub", token=TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("MTPQUANT_CACHE", str(tmp_path / "mtpquant-cache"))
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


def publish_gguf(server: HubServer, synthetic: dict, repo: str = REPO, skip: tuple[int, ...] = ()) -> str:
    files: dict = {f"BF16/{p.name}": p for i, p in enumerate(synthetic["shards"], 1) if i not in skip}
    files["README.md"] = README
    return server.commit(repo, files, message="BF16 shards")


def publish_hf(server: HubServer, synthetic: dict, repo: str = HF_REPO) -> str:
    files: dict = {p.name: p for p in synthetic["hf"].iterdir()}
    files["README.md"] = README
    return server.commit(repo, files, message="safetensors checkpoint")


def make_recipe(tmp_path: Path, hf: dict, **extra) -> rc.Recipe:
    data = {"name": "tiny-hf", "source": {"hf": hf}, "variants": [{"type": "Q4_K_M"}], **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return rc.load(path)


def source_json(run: Path) -> dict:
    """receipts/source.json with its provider's provenance fields beside the common ones, for assertions."""
    data = json.loads((run / "receipts" / "source.json").read_text())
    return {**data.pop("provenance"), **data}


def prepare(recipe: rc.Recipe, out: Path, progress=None) -> SourceModel:
    run = RunDir(out)
    run.ensure()
    return source.prepare(recipe, run, progress or (lambda *a: None))


def gguf_recipe(tmp_path: Path, revision: str = "main", files: str = "BF16/tiny-mtp-BF16-*.gguf"):
    return make_recipe(tmp_path, {"repo": REPO, "revision": revision, "files": files})


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def api_calls(server: HubServer) -> list[str]:
    return [p for m, p in server.requests if p.startswith("/api/")]


# ----------------------------------------------------------------------------------------------- pinning

def test_branch_resolves_to_commit_and_the_receipt_names_every_sha256(tmp_path, hub, synthetic):
    commit = publish_gguf(hub, synthetic)
    model = prepare(gguf_recipe(tmp_path), tmp_path / "run")
    receipt = source_json(tmp_path / "run")
    names = [f"BF16/{p.name}" for p in synthetic["shards"]]
    assert (receipt["repo"], receipt["revision"], receipt["commit"], receipt["endpoint"]) == (REPO, "main", commit,
                                                                                              hub.url)
    assert [(f["name"], f["sha256"], f["size"], f["lfs"]) for f in receipt["hf_files"]] == [
        (n, sha256(p), p.stat().st_size, True) for n, p in zip(names, synthetic["shards"])]
    assert receipt["files"] == {p.name: sha256(p) for p in synthetic["shards"]}
    # real files under their own names (hard links to the Hugging Face cache's blobs): llama.cpp finds shards by name
    linked = tmp_path / "mtpquant-cache" / "hf" / "models--mtpquant-test--tiny-mtp-GGUF" / commit
    assert model.path == linked / names[0] and not model.path.is_symlink()
    blobs = tmp_path / "hf-cache" / "models--mtpquant-test--tiny-mtp-GGUF" / "blobs"
    assert all((blobs / sha256(p)).samefile(linked / n) for n, p in zip(names, synthetic["shards"]))
    assert model.info.nextn.complete and len(model.info.paths) == len(synthetic["shards"])


@pytest.mark.parametrize("revision", ["v1", "full-sha"])
def test_tag_or_full_sha_pins_that_commit_not_the_branch_head(tmp_path, hub, synthetic, revision):
    first = publish_gguf(hub, synthetic)
    hub.tag(REPO, "v1", first)
    hub.commit(REPO, {"README.md": b"# moved on\n"})
    rev = first if revision == "full-sha" else revision
    prepare(gguf_recipe(tmp_path, rev), tmp_path / "run")
    receipt = source_json(tmp_path / "run")
    assert (receipt["revision"], receipt["commit"]) == (rev, first)


def test_a_run_keeps_its_recorded_commit_when_the_branch_moves(tmp_path, hub, synthetic):
    first = publish_gguf(hub, synthetic)
    recipe = gguf_recipe(tmp_path)
    prepare(recipe, tmp_path / "run")
    second = hub.commit(REPO, {"README.md": b"# a newer card\n"})
    calls = len(api_calls(hub))
    prepare(recipe, tmp_path / "run")
    receipt = source_json(tmp_path / "run")
    assert (receipt["commit"], receipt["commit_from_receipt"]) == (first, True)
    assert len(api_calls(hub)) == calls  # resolved once: the re-run asked the hub nothing
    prepare(recipe, tmp_path / "fresh-run")
    assert source_json(tmp_path / "fresh-run")["commit"] == second


@pytest.mark.parametrize("offline", [False, True], ids=["endpoint-down", "HF_HUB_OFFLINE"])
def test_rerun_uses_the_cache_with_the_endpoint_stopped(tmp_path, hub, synthetic, monkeypatch, offline):
    commit = publish_gguf(hub, synthetic)
    recipe = gguf_recipe(tmp_path)
    first = prepare(recipe, tmp_path / "run")
    hub.stop()
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = prepare(recipe, tmp_path / "run")
    assert again.path == first.path and again.files == first.files
    assert source_json(tmp_path / "run")["commit"] == commit


def test_a_recorded_commit_missing_from_the_cache_needs_the_hub(tmp_path, hub, synthetic, monkeypatch):
    commit = publish_gguf(hub, synthetic)
    recipe = gguf_recipe(tmp_path)
    prepare(recipe, tmp_path / "run")
    shutil.rmtree(tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (with the endpoint merely down, huggingface_hub retries ~20 s first)
    with pytest.raises(HubError) as ei:
        prepare(recipe, tmp_path / "run")
    assert ei.value.one_line() == (
        f"BF16/{synthetic['shards'][0].name} of {REPO}@{commit[:12]} is not in the Hugging Face cache, and {hub.url} "
        "may not be asked (HF_HUB_OFFLINE is set) (connect to the hub (unset HF_HUB_OFFLINE) to download it once)")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert prepare(recipe, tmp_path / "run").provenance["commit"] == commit


def test_first_run_offline_is_refused_clearly(tmp_path, hub, synthetic, monkeypatch):
    publish_gguf(hub, synthetic)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as ei:
        prepare(gguf_recipe(tmp_path), tmp_path / "run")
    assert ei.value.one_line() == (
        f"HF_HUB_OFFLINE is set and this run has not yet resolved {REPO}@main (run once online; re-runs of this run "
        "directory then use the Hugging Face cache)")
    assert hub.requests == []


def test_first_run_with_the_endpoint_down_is_refused_clearly(tmp_path, hub, synthetic):
    publish_gguf(hub, synthetic)
    hub.stop()
    with pytest.raises(HubError) as ei:
        prepare(gguf_recipe(tmp_path), tmp_path / "run")
    assert ei.value.one_line() == (
        f"cannot reach {hub.url} to resolve {REPO}@main ([Errno 111] Connection refused), and this run has no "
        "recorded commit to use from the cache (check the network and HF_ENDPOINT; once a run has fetched this "
        "revision, re-runs work offline from the cache)")


# ----------------------------------------------------------------------------------------------- integrity

def test_a_corrupted_file_is_refused_and_nothing_downstream_runs(tmp_path, hub, synthetic, toolchain):
    commit = publish_gguf(hub, synthetic)
    bad = synthetic["shards"][1]
    hub.corrupt(REPO, f"BF16/{bad.name}")
    served = hashlib.sha256((hub.root / REPO / "objects" / sha256(bad)).read_bytes()).hexdigest()
    recipe = make_recipe(tmp_path, {"repo": REPO, "revision": "main", "files": "BF16/tiny-mtp-BF16-*.gguf"})
    out = tmp_path / "out"
    with pytest.raises(IntegrityError) as ei:
        pipeline.build(recipe, out, toolchain)
    assert ei.value.one_line() == (
        f"BF16/{bad.name} from {REPO}@{commit[:12]}: sha256 mismatch: expected {sha256(bad)}, got {served} (the "
        "damaged copy was removed from the Hugging Face cache and nothing was built from it; run again to download "
        "it afresh)")
    assert (ei.value.file, ei.value.expected, ei.value.got) == (f"BF16/{bad.name}", sha256(bad), served)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "logs", "receipts", "work"]
    assert [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"] == []
    snapshot = tmp_path / "hf-cache" / "models--mtpquant-test--tiny-mtp-GGUF" / "snapshots" / commit / "BF16"
    assert not (snapshot / bad.name).exists()  # evicted: a later run downloads it again
    assert served not in {p.name for p in (snapshot.parents[2] / "blobs").iterdir()}


def test_a_small_git_file_is_checked_against_its_blob_id(tmp_path, hub, synthetic):
    publish_hf(hub, synthetic)
    snap = hubm.resolve(HF_REPO, "main", hub.url)
    config = next(f for f in snap.files if f.name == "config.json")
    assert not config.lfs and config.sha256 is None
    assert config.git_oid == hashlib.sha1(b"blob %d\0" % config.size + (synthetic["hf"] / "config.json").read_bytes()
                                          ).hexdigest()
    cfg = hubm.settings()
    paths = hubm.download(snap, (config,), cfg)
    paths["config.json"].resolve().write_bytes(b"{}" + paths["config.json"].read_bytes()[2:])
    with pytest.raises(IntegrityError) as ei:
        hubm.verify(snap, (config,), paths, {})
    assert ei.value.what == "git blob id" and ei.value.expected == config.git_oid


# ----------------------------------------------------------------------------------------------- clear errors

@pytest.mark.parametrize("case, hf, expected", [
    ("unknown repo", {"repo": "mtpquant-test/nope", "revision": "main", "files": "x.gguf"},
     ("{recipe}: source.hf.repo: mtpquant-test/nope was not found on {url} (check the repo id; a private repo also "
      "needs a token (set HF_TOKEN or run `hf auth login` with a token that can read it))")),
    ("unknown revision", {"repo": REPO, "revision": "v9", "files": "x.gguf"},
     (f"{{recipe}}: source.hf.revision: 'v9' is not a branch, tag or commit of {REPO} (give an existing branch, tag "
      "or full commit sha)")),
    ("unknown commit", {"repo": REPO, "revision": "0" * 40, "files": "x.gguf"},
     (f"{{recipe}}: source.hf.revision: '{'0' * 40}' is not a branch, tag or commit of {REPO} (give an existing "
      "branch, tag or full commit sha)")),
    ("gated, no token", {"repo": "mtpquant-test/gated", "revision": "main", "files": "x.gguf"},
     ("{recipe}: source.hf.repo: mtpquant-test/gated is gated and no token was given (accept its terms on the Hub, "
      "then set HF_TOKEN or run `hf auth login` with a token that can read it)")),
])
def test_hub_refusals_are_one_clear_line(tmp_path, hub, synthetic, case, hf, expected):
    publish_gguf(hub, synthetic)
    hub.create_repo("mtpquant-test/gated", gated=True)
    hub.commit("mtpquant-test/gated", {"x.gguf": synthetic["shards"][0]})
    recipe = make_recipe(tmp_path, hf)
    with pytest.raises(HubError) as ei:
        prepare(recipe, tmp_path / "run")
    assert ei.value.one_line() == expected.format(recipe=recipe.path, url=hub.url)
    assert not (tmp_path / "run" / "receipts" / "source.json").exists()


def test_a_refused_token_is_one_clear_line(tmp_path, hub, synthetic, monkeypatch):
    hub.create_repo("mtpquant-test/gated", gated=True)
    publish_gguf(hub, synthetic, repo="mtpquant-test/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubError) as ei:
        prepare(make_recipe(tmp_path, {"repo": "mtpquant-test/gated", "revision": "main", "files": "x.gguf"}),
                tmp_path / "run")
    assert ei.value.one_line() == (f"{hub.url} refused the Hugging Face token (Invalid credentials in Authorization "
                                   "header) (set HF_TOKEN or run `hf auth login` with a token that can read it)")


def test_a_pre_tokenizer_for_a_gguf_source_is_refused(tmp_path, hub, synthetic):
    publish_gguf(hub, synthetic)
    recipe = make_recipe(tmp_path, {"repo": REPO, "revision": "main", "files": "BF16/*.gguf", "pre_tokenizer": "qwen2"})
    with pytest.raises(HubError) as ei:
        prepare(recipe, tmp_path / "run")
    assert ei.value.one_line() == (f"{recipe.path}: source.hf.pre_tokenizer: only used when converting safetensors, "
                                   "and 'BF16/*.gguf' is a GGUF (remove it, or set source.hf.files: safetensors)")


def test_a_gated_repo_downloads_with_HF_TOKEN(tmp_path, hub, synthetic, monkeypatch):
    hub.create_repo("mtpquant-test/gated", gated=True)
    commit = publish_gguf(hub, synthetic, repo="mtpquant-test/gated")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe = make_recipe(tmp_path, {"repo": "mtpquant-test/gated", "revision": "main",
                                    "files": "BF16/tiny-mtp-BF16-00001-of-00003.gguf"})
    assert prepare(recipe, tmp_path / "run").provenance["commit"] == commit


@pytest.mark.parametrize("spec, expected", [
    ("BF16/tiny-mtp-BF16-00001-of-00003.gguf", ["BF16/tiny-mtp-BF16-0000{}-of-00003.gguf"]),
    ("BF16/*.gguf", ["BF16/tiny-mtp-BF16-0000{}-of-00003.gguf"]),
    ("single/tiny-mtp-Q8_0.gguf", ["single/tiny-mtp-Q8_0.gguf"]),
    ("safetensors", ["README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]),
    ("*.gguf", ("{recipe}: source.hf.files: '*.gguf' matches 2 GGUF models of {where}: "
                "BF16/tiny-mtp-BF16-*-of-00003.gguf, single/tiny-mtp-Q8_0.gguf (narrow it to one model (its file "
                "name, or its shards' pattern))")),
    ("tiny.gguf", ("{recipe}: source.hf.files: 'tiny.gguf' matches no GGUF file of {where} (GGUF files there: "
                   "BF16/tiny-mtp-BF16-00001-of-00003.gguf, BF16/tiny-mtp-BF16-00002-of-00003.gguf, "
                   "BF16/tiny-mtp-BF16-00003-of-00003.gguf, single/tiny-mtp-Q8_0.gguf) (give a .gguf file name, a "
                   "shard pattern such as 'BF16/*.gguf', or 'safetensors')")),
])
def test_file_selection(tmp_path, hub, synthetic, spec, expected):
    files: dict = {f"BF16/{p.name}": p for p in synthetic["shards"]}
    files.update({"single/tiny-mtp-Q8_0.gguf": b"GGUF stand-in", "README.md": README})
    files.update({p.name: p for p in synthetic["hf"].iterdir()})
    hub.commit(REPO, files)
    snap = hubm.resolve(REPO, "main", hub.url)
    recipe_path = tmp_path / "r.yaml"
    if isinstance(expected, str):
        with pytest.raises(HubError) as ei:
            hubm.select(snap, spec, recipe_path)
        assert ei.value.one_line() == expected.format(recipe=recipe_path, where=snap.where)
    else:
        names = [n.format(i) for n in expected for i in ((1, 2, 3) if "{}" in n else (None,))]
        assert [f.name for f in hubm.select(snap, spec, recipe_path)[1]] == names


def test_a_split_gguf_with_a_missing_shard_is_refused(tmp_path, hub, synthetic):
    commit = publish_gguf(hub, synthetic, skip=(2,))
    recipe = gguf_recipe(tmp_path)
    with pytest.raises(HubError) as ei:
        prepare(recipe, tmp_path / "run")
    assert ei.value.one_line() == (
        f"{recipe.path}: source.hf.files: the split GGUF BF16/tiny-mtp-BF16 at {REPO}@{commit[:12]} lacks shard(s) "
        "BF16/tiny-mtp-BF16-00002-of-00003.gguf (is the upload complete? pin a commit that has every shard)")


def test_a_checkpoint_that_cannot_match_the_recipe_is_refused_before_its_weights_download(tmp_path, hub, synthetic):
    commit = publish_hf(hub, synthetic)
    recipe = make_recipe(tmp_path, {"repo": HF_REPO, "revision": "main", "files": "safetensors"},
                         expect={"main_layers": 40, "nextn_layers": 1})
    with pytest.raises(MtpquantError) as ei:
        prepare(recipe, tmp_path / "run")
    assert ei.value.one_line() == (f"source {HF_REPO}@{commit[:12]} config.json: has 2 main layers, the recipe "
                                   "expects 40 (check the recipe's source and expect fields)")
    assert not any(p.endswith("model.safetensors") for _, p in hub.requests)


def test_a_gguf_that_cannot_match_the_recipe_is_refused_before_its_download(tmp_path, hub, synthetic):
    commit = publish_gguf(hub, synthetic)
    recipe = make_recipe(tmp_path, {"repo": REPO, "revision": "main", "files": "BF16/*.gguf"},
                         expect={"arch": "qwen35", "main_layers": 40, "nextn_layers": 1})
    with pytest.raises(MtpquantError) as ei:
        prepare(recipe, tmp_path / "run")
    assert ei.value.one_line() == (
        f"source {REPO}@{commit[:12]} BF16/{synthetic['shards'][0].name} (header): architecture is qwen35moe, the "
        "recipe expects qwen35; has 2 main layers, the recipe expects 40 (check the recipe's source and expect fields)")
    assert not (tmp_path / "hf-cache" / "models--mtpquant-test--tiny-mtp-GGUF" / "blobs").exists()


def test_the_header_peek_reads_what_inspect_reads(tmp_path, synthetic):
    data = synthetic["shards"][0].read_bytes()
    asked = []

    def fetch(offset: int, size: int) -> bytes:
        asked.append((offset, size))
        return data[offset:offset + size]

    info = read_model(synthetic["shards"][0])
    assert hubm.read_gguf_header(fetch) == {
        "arch": info.arch, "block_count": info.block_count, "nextn_layers": info.nextn.layers}
    assert asked == [(0, 1 << 20)]


def test_the_header_peek_reads_through_arrays_when_there_is_no_nextn_key(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "plain.gguf"
    writer = gguf.GGUFWriter(path, "qwen35moe")
    writer.add_block_count(3)
    writer.add_token_list([f"tok{i}" for i in range(50_000)])
    writer.add_token_types([1] * 50_000)
    writer.add_float32("qwen35moe.rope.freq_base", 1e7)
    writer.add_tensor("blk.0.attn_k.weight", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    header = hubm.read_gguf_header(lambda offset, size: data[offset:offset + size])
    assert header == {"arch": "qwen35moe", "block_count": 3, "nextn_layers": 0}


def test_download_and_verify_report_progress_in_bytes(tmp_path, hub, synthetic):
    publish_gguf(hub, synthetic)
    events = []
    prepare(gguf_recipe(tmp_path), tmp_path / "run", lambda *e: events.append(e))
    total = sum(p.stat().st_size for p in synthetic["shards"])
    for label in (f"download {REPO}", f"verify {REPO}"):
        mine = [(d, t) for lab, d, t in events if lab == label]
        assert mine[-1] == (total, total) and all(t == total for _, t in mine)
        assert [d for d, _ in mine] == sorted(d for d, _ in mine)


# ----------------------------------------------------------------------------------------------- the server itself

def test_the_loopback_hub_serves_ranges_and_snapshots(tmp_path, hub, synthetic):
    from huggingface_hub import snapshot_download

    commit = publish_gguf(hub, synthetic)
    shard = synthetic["shards"][0]
    req = urllib.request.Request(f"{hub.url}/{REPO}/resolve/main/BF16/{shard.name}", headers={"Range": "bytes=4-"})
    with urllib.request.urlopen(req) as r:
        assert (r.status, r.headers["Content-Range"], r.headers["X-Repo-Commit"]) == (
            206, f"bytes 4-{shard.stat().st_size - 1}/{shard.stat().st_size}", commit)
        assert r.read() == shard.read_bytes()[4:]
    folder = Path(snapshot_download(REPO, revision="main", endpoint=hub.url, cache_dir=tmp_path / "snap"))
    assert folder.name == commit
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(
        ["README.md"] + [f"BF16/{p.name}" for p in synthetic["shards"]])


# ----------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_build_end_to_end_from_the_loopback_hub(tmp_path, hub, synthetic, toolchain):
    commit = publish_gguf(hub, synthetic)
    recipe = rc.load(TESTS / "recipes" / "hf-loopback.yaml")
    result = pipeline.build(recipe, tmp_path / "out", toolchain)
    receipt = source_json(tmp_path / "out")
    assert (receipt["kind"], receipt["repo"], receipt["revision"], receipt["commit"]) == ("hf", REPO, "main", commit)
    assert {f["name"]: f["sha256"] for f in receipt["hf_files"]} == {f"BF16/{p.name}": sha256(p)
                                                                     for p in synthetic["shards"]}
    [variant] = result.variants
    info = read_model(variant.path)
    assert info.nextn.complete and info.file_type_name == "Q4_K_M"
    assert {t.name: t.type for t in info.tensors}["blk.2.nextn.eh_proj.weight"] == "Q8_0"
    quantize = json.loads((tmp_path / "out" / "receipts" / "quantize-Q4_K_M.json").read_text())
    assert quantize["source_sha256"] == result.plan.source.sha256


def test_pinned_imatrix_from_the_hub(hub, tmp_path, toolchain):
    """imatrix.file.hf: fetched at a pinned revision, checked by the recipe's sha256, copied into the run."""
    from mtpquant.core.files import sha256_file
    from mtpquant.core.procs import run_tool

    model = tmp_path / "m.gguf"
    synth.write_gguf(model, SPEC)
    corpus = TESTS.parent / "imatrix" / "codemath-chat-v1.txt"
    im = tmp_path / "calib.imatrix.gguf"
    run_tool([toolchain.tool("llama-imatrix"), "-m", model, "-f", corpus, "-o", im, "--chunks", "2", "-c", "128",
              "-b", "128", "--nextn", "--no-ppl"], log_path=tmp_path / "im.log")
    commit = hub.commit("mtpquant-test/imatrix", {"calib.imatrix.gguf": im, "README.md": README})
    sha = sha256_file(im)
    imatrix = {"file": {"hf": {"repo": "mtpquant-test/imatrix", "revision": "main", "path": "calib.imatrix.gguf"},
                        "sha256": sha}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-im", "source": {"path": str(model)}, "imatrix": imatrix,
                                    "variants": [{"type": "IQ3_XXS"}]}, sort_keys=False))
    result = pipeline.build(rc.load(path), tmp_path / "out", toolchain)
    assert result.imatrix.sha256 == sha and result.imatrix.path == tmp_path / "out" / "tiny-im.imatrix.gguf"
    origin = json.loads((tmp_path / "out" / "receipts" / "imatrix-source.json").read_text())
    assert origin["commit"] == commit and origin["path"] == "calib.imatrix.gguf"
    receipt = json.loads((tmp_path / "out" / "receipts" / "quantize-IQ3_XXS.json").read_text())
    assert receipt["draft_head"] == "collected" and receipt["imatrix_sha256"] == sha
    wrong = path.read_text().replace(sha, "f" * 64)
    path.write_text(wrong)
    with pytest.raises(MtpquantError) as ei:
        pipeline.build(rc.load(path), tmp_path / "out2", toolchain)
    assert ei.value.message.endswith(f"sha256 is {sha}, the recipe pins {'f' * 64}")
