"""mtpquant as users install it: a wheel in a fresh virtual environment (no system site packages, not editable),
running the demo build from a folder outside the checkout with the environment's own console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo-tiny.yaml"
CORPUS = REPO / "imatrix" / "codemath-chat-v1.txt"
# Variables that would let the fresh environment see the checkout or the test runner's packages.
LEAKS = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV", "PIP_USER", "PIP_TARGET", "PIP_PREFIX")


def run(argv: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, argv))} exited with {result.returncode}:\n" + (
        result.stdout + result.stderr)[-3000:]
    return result


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_builds_the_demo(tmp_path, toolchain):
    env = {k: v for k, v in os.environ.items() if k not in LEAKS}
    env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "MTPQUANT_LLAMA_CPP": str(toolchain.bin_dir),
                "MTPQUANT_CACHE": str(tmp_path / "cache")})
    # a copy of the checkout's tree: the wheel is built from tracked sources, not from this checkout's build/
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", ".venv", "out", "*.incomplete"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "wheels", src], tmp_path, env)
    [wheel] = (tmp_path / "wheels").glob("mtpquant-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, mtpquant = venv / "bin" / "python", venv / "bin" / "mtpquant"
    run([python, "-m", "pip", "install", "-q", wheel], tmp_path, env)
    where = run([python, "-c", "import mtpquant; print(mtpquant.__file__)"], tmp_path, env).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(REPO)
    # the data smoke and eval read (left out of the build below to keep it short) comes with the wheel
    shipped = run([python, "-c", "from mtpquant.measure.kld import default_text; "
                   "from mtpquant.measure.smoke.suite import SUITE_PATH, load_suite; "
                   "print(default_text()); print(SUITE_PATH); print(len(load_suite()))"], tmp_path, env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in shipped[:2]) and int(shipped[2]) >= 10

    # the demo recipe without smoke and eval (the full demo takes minutes; they measure, and make no file)
    data = yaml.safe_load(RECIPE.read_text())
    for measured in ("smoke", "eval"):
        data.pop(measured, None)
    user = tmp_path / "user"
    (user / "recipes").mkdir(parents=True)
    (user / "imatrix").mkdir()
    shutil.copyfile(CORPUS, user / "imatrix" / CORPUS.name)
    (user / "recipes" / "demo-tiny.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "runs" / "demo"
    run([mtpquant, "build", "recipes/demo-tiny.yaml", "--out", out, "-q"], user, env)
    card = (out / "README.md").read_text()
    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    for name, sha in sums.items():
        assert f"`{sha}`" in card, name
    assert sorted(sums) == ["demo-tiny-mtp-IQ3_XXS.gguf", "demo-tiny-mtp-IQ4_XS.gguf", "demo-tiny-mtp-Q4_K_M.gguf",
                            "demo-tiny-mtp.imatrix.gguf"]
    report = json.loads(run([mtpquant, "verify", out, "--json", "-q"], user, env).stdout)
    assert report["ok"] is True and report["artifacts"] == sums
