"""GGUF header values are untrusted: headers of a small synthetic model with counts, lengths, dimensions, tensor
types, offsets, layer numbers and value types changed make `mtpquant inspect` and `mtpquant fit` either read the
file or say why not in one `error:` line: quickly, without a traceback, a hang or a memory blow-up."""

from __future__ import annotations

import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile_gguf import VT, array_value, join, parts, poke, scalar_value, string_value

from mtpquant import synth
from mtpquant.cli import main

ARCH = "qwen35moe"
SECONDS = 5.0  # a header of 4 MiB is read in milliseconds; a forged count must not make it minutes
PEAK_BYTES = 64 << 20  # Python allocations while reading one header
HOSTILE_INTS = [0, 1, 3, 5, 63, 64, 4096, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
                (1 << 64) - 1]
DAMAGED = "(the file's metadata is damaged; regenerate it)"
CORRUPT = "(download or regenerate the file)"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile-gguf") / "src.gguf"
    synth.write_gguf(path, synth.SynthSpec(arch=ARCH, seed=0))
    return path


def _alarm(signum, frame):
    raise TimeoutError(f"no answer within {SECONDS * 4:g} s")


def cli(args: list[str]):
    """Run the CLI in this process with a watchdog and the peak of Python allocations measured."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, SECONDS * 4)
    try:
        res = CliRunner().invoke(main, args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return res, time.monotonic() - started, peak


def assert_read_or_one_line(args: list[str], what: str):
    """The command either succeeds silently on stderr or exits 1/2 with exactly one `error:` line."""
    res, seconds, peak = cli(args)
    assert not isinstance(res.exception, TimeoutError), f"{what}: hung"
    assert seconds < SECONDS, f"{what}: took {seconds:.1f} s"
    assert peak < PEAK_BYTES, f"{what}: allocated {peak >> 20} MiB"
    if res.exit_code == 0:
        assert res.stderr == "", f"{what}: {res.stderr}"
    else:
        assert isinstance(res.exception, SystemExit), f"{what}: {res.exception!r}"  # a typed error, not a bug
        assert res.exit_code in (1, 2), what
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, f"{what}: {res.stderr!r}"
    return res


def rewritten(src: Path, dst: Path, kv: dict[str, bytes] | None = None, blk: tuple[str, str] | None = None) -> Path:
    p = parts(src)
    p.kv.update(kv or {})
    if blk:
        p.tensors = [(n.replace(f"blk.{blk[0]}.", f"blk.{blk[1]}."), info) for n, info in p.tensors]
    dst.write_bytes(join(p))
    return dst


# ----------------------------------------------------------------------------------------------- fuzz

@pytest.mark.parametrize("seed", range(3))
def test_poked_header_fields_read_or_fail_in_one_line(src, tmp_path, seed):
    """Each kind of integer field of the header (counts, key/string/name lengths, value and array types, array
    counts, n_dims, dimensions, tensor types, offsets), a few of each, set to values at and past every width."""
    rng = random.Random(seed)
    spots = parts(src).spots
    kinds = sorted({s.what for s in spots})
    out = tmp_path / "m.gguf"
    for kind in kinds:
        of_kind = [s for s in spots if s.what == kind]
        for spot in rng.sample(of_kind, min(2, len(of_kind))):
            for value in rng.sample(HOSTILE_INTS, 3):
                poke(src, out, spot, value)
                assert_read_or_one_line(["inspect", str(out)], f"{kind} of {spot.owner or 'header'} = {value}")


@pytest.mark.parametrize("seed", range(2))
def test_random_header_bytes_and_truncations(src, tmp_path, seed):
    rng = random.Random(100 + seed)
    raw = src.read_bytes()
    header_end = len(raw) - len(parts(src).data)
    out = tmp_path / "m.gguf"
    for i in range(40):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(header_end)] = rng.randrange(256)
        out.write_bytes(bytes(b))
        assert_read_or_one_line(["inspect", str(out)], f"bytes changed, case {i}")
    for _ in range(15):
        cut = rng.randrange(header_end + 64)
        out.write_bytes(raw[:cut])
        res = assert_read_or_one_line(["inspect", str(out)], f"cut at byte {cut}")
        assert res.exit_code == 2


WRONG_TYPES = {"a string": string_value("3"), "a float": scalar_value(VT.FLOAT32, 3.0),
               "a bool": scalar_value(VT.BOOL, True), "a negative int64": scalar_value(VT.INT64, -1),
               "a huge uint64": scalar_value(VT.UINT64, 1 << 62), "an array": array_value(VT.UINT32, [3, 3]),
               "an array of strings": array_value(VT.STRING, ["3"])}
TYPED_KEYS = [f"{ARCH}.block_count", f"{ARCH}.nextn_predict_layers", "general.file_type", "general.alignment",
              "general.architecture", f"{ARCH}.embedding_length", f"{ARCH}.attention.head_count_kv",
              f"{ARCH}.full_attention_interval", f"{ARCH}.expert_used_count", f"{ARCH}.attention.recurrent_layers",
              f"{ARCH}.vocab_size", "tokenizer.chat_template"]


@pytest.mark.parametrize("key", TYPED_KEYS)
def test_values_of_the_wrong_type(src, tmp_path, key):
    for what, raw in WRONG_TYPES.items():
        out = rewritten(src, tmp_path / "m.gguf", {key: raw})
        for command in ("inspect", "fit"):
            assert_read_or_one_line([command, str(out)], f"{command}: {key} as {what}")


# ----------------------------------------------------------------------------------------------- exact messages

def _spot(src: Path, what: str, owner: str | None = None, index: int = 0):
    return [s for s in parts(src).spots if s.what == what and (owner is None or s.owner == owner)][index]


@pytest.mark.parametrize("what, owner, value, detail", [
    ("n_tensors", None, (1 << 64) - 1, "implausible tensor or key count (18446744073709551615 tensors, 39 keys)"),
    ("n_kv", None, 10_000_001, "implausible tensor or key count (58 tensors, 10000001 keys)"),
    ("key_len", None, 1 << 63, "a 9223372036854775808-byte name at byte 24"),
    ("array_count", "tokenizer.ggml.tokens", 1 << 62, "an array of 4611686018427387904 elements at byte {at}"),
    ("n_dims", "token_embd.weight", 5, "tensor token_embd.weight has 5 dimensions, llama.cpp takes at most 4"),
    ("dim", "token_embd.weight", 1 << 63,
     "tensor token_embd.weight has shape [9223372036854775808, 317], more elements than llama.cpp can count"),
    ("tensor_type", "token_embd.weight", 200, "unknown tensor type 200"),
    ("offset", "blk.0.attn_norm.weight", 7, "tensor blk.0.attn_norm.weight has data offset 7, expected {expected}"),
])
def test_exact_message_for_a_forged_field(src, tmp_path, what, owner, value, detail):
    spot = _spot(src, what, owner)
    out = poke(src, tmp_path / "m.gguf", spot, value)
    res = assert_read_or_one_line(["inspect", str(out)], what)
    if "{at}" in detail:
        detail = detail.format(at=spot.offset - 4)  # the array's type tag
    if "{expected}" in detail:
        detail = detail.format(expected=struct.unpack_from("<Q", src.read_bytes(), spot.offset)[0])
    assert res.exit_code == 2
    assert res.stderr == f"error: {out}: truncated or corrupt GGUF ({detail}) {CORRUPT}\n"


def test_a_string_count_the_file_cannot_hold_stops_at_once(src, tmp_path):
    """5 million strings of at least 8 bytes each do not fit in a 4 MiB file: refused before the first is read."""
    out = poke(src, tmp_path / "m.gguf", _spot(src, "array_count", "tokenizer.ggml.tokens"), 5_000_000)
    res = assert_read_or_one_line(["inspect", str(out)], "string count")
    assert res.stderr == (f"error: {out}: truncated or corrupt GGUF (header ends early at byte {out.stat().st_size}) "
                          f"{CORRUPT}\n")


def test_rows_that_are_not_whole_blocks(src, tmp_path):
    spot = _spot(src, "tensor_type", "blk.0.ssm_conv1d.weight")  # rows of 4 elements
    out = poke(src, tmp_path / "m.gguf", spot, 12)  # Q4_K: blocks of 256
    res = assert_read_or_one_line(["inspect", str(out)], "row size")
    assert res.stderr == (f"error: {out}: truncated or corrupt GGUF (tensor blk.0.ssm_conv1d.weight: rows of 4 "
                          f"elements are not a multiple of the Q4_K block size 256) {CORRUPT}\n")


def test_a_huge_string_is_refused_without_being_read(src, tmp_path):
    """A chat template claiming 100 MiB in a file that has them (a sparse tail): refused, nothing allocated."""
    spot = _spot(src, "str_len", "tokenizer.chat_template")
    out = poke(src, tmp_path / "m.gguf", spot, 100 << 20)
    os.truncate(out, out.stat().st_size + (200 << 20))
    res = assert_read_or_one_line(["inspect", str(out)], "huge string")
    assert res.stderr == (f"error: {out}: truncated or corrupt GGUF (a 104857600-byte string at byte {spot.offset}) "
                          f"{CORRUPT}\n")


@pytest.mark.parametrize("kv, blk, command, message", [
    ({f"{ARCH}.block_count": string_value("3")}, None, "inspect",
     f"{ARCH}.block_count is str '3', expected an integer {DAMAGED}"),
    ({f"{ARCH}.nextn_predict_layers": scalar_value(VT.FLOAT32, 1.0)}, None, "inspect",
     f"{ARCH}.nextn_predict_layers is float 1.0, expected an integer {DAMAGED}"),
    ({"general.file_type": array_value(VT.UINT32, [32, 32])}, None, "inspect",
     f"general.file_type is array [32, 32], expected an integer {DAMAGED}"),
    ({f"{ARCH}.block_count": scalar_value(VT.UINT32, (1 << 32) - 1)}, None, "inspect",
     f"{ARCH}.block_count is 4294967295, outside 0..4096 {DAMAGED}"),
    ({f"{ARCH}.nextn_predict_layers": scalar_value(VT.UINT32, 4)}, None, "inspect",
     f"{ARCH}.nextn_predict_layers is 4, more than {ARCH}.block_count 3 {DAMAGED}"),
    ({}, ("2", "999999999"), "inspect",
     f"tensor blk.999999999.attn_norm.weight is in block 999999999, but {ARCH}.block_count is 3 {DAMAGED}"),
    ({f"{ARCH}.embedding_length": string_value("256")}, None, "fit",
     f"{ARCH}.embedding_length is str '256', expected an integer {DAMAGED}"),
    ({f"{ARCH}.attention.head_count_kv": array_value(VT.INT32, [1, -1, 1])}, None, "fit",
     f"{ARCH}.attention.head_count_kv[1] is -1, outside 0..65536 {DAMAGED}"),
    ({f"{ARCH}.expert_used_count": scalar_value(VT.UINT64, 1 << 40)}, None, "fit",
     f"{ARCH}.expert_used_count is 1099511627776, outside 0..65536 {DAMAGED}"),
    ({f"{ARCH}.attention.recurrent_layers": array_value(VT.STRING, ["yes"])}, None, "fit",
     f"{ARCH}.attention.recurrent_layers is not an array of booleans {DAMAGED}"),
])
def test_exact_message_for_a_value_of_the_wrong_type_or_range(src, tmp_path, kv, blk, command, message):
    out = rewritten(src, tmp_path / "m.gguf", kv, blk)
    res = assert_read_or_one_line([command, str(out)], message)
    assert res.exit_code == 2
    assert res.stderr == f"error: {out}: {message}\n"


@pytest.mark.parametrize("raw, shown", [(string_value("32"), "'32'"), (scalar_value(VT.UINT32, 48), "48")])
def test_alignment_must_be_a_power_of_two(src, tmp_path, raw, shown):
    out = rewritten(src, tmp_path / "m.gguf", {"general.alignment": raw})
    res = assert_read_or_one_line(["inspect", str(out)], "alignment")
    assert res.stderr == (f"error: {out}: truncated or corrupt GGUF (general.alignment is {shown}, not a power of 2) "
                          f"{CORRUPT}\n")


# ----------------------------------------------------------------------------------------------- the real command

@pytest.mark.parametrize("what, owner, value", [("array_count", "tokenizer.ggml.tokens", 1 << 62),
                                                ("n_tensors", None, 9_999_999)])
def test_real_command_under_a_memory_limit(src, tmp_path, what, owner, value):
    """`mtpquant inspect` as a user runs it, with 2 GiB of address space and a deadline: one line, no traceback."""
    out = poke(src, tmp_path / "m.gguf", _spot(src, what, owner), value)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    proc = subprocess.run([sys.executable, "-m", "mtpquant", "inspect", str(out)], check=False, capture_output=True,
                          text=True, timeout=120, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {out}: truncated or corrupt GGUF (") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
