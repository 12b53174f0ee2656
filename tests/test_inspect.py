"""`inspect` on models, split models, imatrix files and bad files: one clear line, never a numpy traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from mtpquant import synth
from mtpquant.core.errors import GGUFReadError
from mtpquant.modelfile.imatrix import read_imatrix
from mtpquant.modelfile.model import read_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    synth.write_gguf(path, synth.SynthSpec(seed=1))
    return path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mtpquant", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_model_summary(tiny):
    info = read_model(tiny)
    assert info.arch == "qwen35moe"
    assert (info.block_count, info.n_layer, info.nextn.layers, info.nextn.blocks) == (3, 2, 1, (2,))
    assert info.nextn.complete
    assert "blk.2.nextn.eh_proj.weight" in info.nextn.present
    assert info.file_type_name == "BF16"
    assert 15.5 < info.bits_per_weight < 16.5


def test_inspect_json_is_clean(tiny):
    r = cli("inspect", tiny, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["nextn_complete"] is True and data["nextn_blocks"] == [2]
    assert len(data["tensors"]) == data["n_tensors"]


def test_dense_arch_nextn_found_from_metadata(tmp_path):
    path = tmp_path / "dense.gguf"
    synth.write_gguf(path, synth.SynthSpec(arch="qwen35", n_layer=3, full_attention_interval=3, seed=2))
    info = read_model(path)
    assert info.arch == "qwen35" and info.nextn.blocks == (3,) and info.nextn.complete


def _strip(src: Path, dest: Path, drop: str) -> None:
    """Rewrite a GGUF without the tensors whose names contain `drop` (metadata kept)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dest, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if drop not in t.name:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_incomplete_nextn_named(tiny, tmp_path):
    broken = tmp_path / "broken.gguf"
    _strip(tiny, broken, "nextn.hnorm")
    info = read_model(broken)
    assert not info.nextn.complete
    assert info.nextn.missing == ("blk.2.nextn.hnorm.weight",)
    r = cli("inspect", broken)
    assert "NextN block:    INCOMPLETE, missing blk.2.nextn.hnorm.weight" in r.stdout


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b""), "{p}: not a GGUF file (starts with 'empty file', expected 'GGUF') "
                                   "(give a .gguf model file)"),
    (lambda p: p.write_text("hello world"), "{p}: not a GGUF file (starts with 'hell', expected 'GGUF') "
                                             "(give a .gguf model file)"),
    (None, "{p}: no such file (check the path)"),
])
def test_bad_files(tmp_path, make, expected):
    p = tmp_path / "x.gguf"
    if make:
        make(p)
    with pytest.raises(GGUFReadError) as ei:
        read_model(p)
    assert ei.value.one_line() == expected.format(p=p)
    r = cli("inspect", p)
    assert r.returncode == 2
    assert r.stderr == "error: " + expected.format(p=p) + "\n"


@pytest.mark.parametrize("keep", [100, 5000, -1000])
def test_truncated_file(tiny, tmp_path, keep):
    data = tiny.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:keep] if keep > 0 else data[:keep])
    r = cli("inspect", p)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {p}: truncated")
    assert r.stderr.rstrip().endswith("(download or regenerate the file)")
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_split_model(tmp_path):
    paths = synth.write_gguf(tmp_path / "s.gguf", synth.SynthSpec(seed=4), split_max_tensors=20)
    assert len(paths) > 1
    info = read_model(paths[0])
    assert info.paths == tuple(paths) and info.nextn.complete
    with pytest.raises(GGUFReadError) as ei:
        read_model(paths[1])
    assert ei.value.message == f"{paths[1]}: this is shard 2 of a split GGUF"
    paths[-1].unlink()
    with pytest.raises(GGUFReadError) as ei:
        read_model(paths[0])
    assert ei.value.one_line() == (f"{paths[0]}: split GGUF is missing shard(s) {paths[-1].name} "
                                   "(download every shard into the same folder)")


def test_imatrix_file(tiny, tmp_path, toolchain):
    from mtpquant.core.procs import run_tool

    corpus = Path(__file__).resolve().parents[1] / "imatrix" / "codemath-chat-v1.txt"
    out = tmp_path / "im.gguf"
    run_tool([toolchain.tool("llama-imatrix"), "-m", tiny, "-f", corpus, "-o", out, "--chunks", "2", "-c", "128",
              "-b", "128", "--nextn", "--no-ppl"], log_path=tmp_path / "im.log")
    info = read_imatrix(out)
    assert info.n_layer_nextn == 1 and info.chunk_count == 2
    assert any(e.startswith("blk.2.") for e in info.entries)
    r = cli("inspect", out, "--json")
    data = json.loads(r.stdout)
    assert data["kind"] == "imatrix" and data["nextn_collected"] is True and 2 in data["blocks_covered"]
    with pytest.raises(GGUFReadError) as ei:
        read_model(out)
    assert ei.value.message == f"{out}: this is an imatrix file, not a model"
