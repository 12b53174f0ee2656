"""`mtpquant publish`: a verified run directory to a Hugging Face repo through the real huggingface_hub client,
against the loopback hub of tests/hubserver.py."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import flip_byte, receipt_json
from hubserver import Fault, HubServer, Reply

from mtpquant.cli import main
from mtpquant.core.errors import PublishError, UsageError, VerifyError
from mtpquant.core.files import sha256_file
from mtpquant.core.rundir import RunDir
from mtpquant.report import publish as pub
from mtpquant.report.audit import verify_run

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from demo_run import build_run

TOKEN = "hf_PublishLoopbackSecret0123456789"
REPO = "mtpquant-test/card-test-MTP-GGUF"
WRITES = ("/api/repos/create", "/preupload/", "/info/lfs/objects/batch", "/lfs-upload/", "/lfs-verify/", "/commit/")
SPLIT_AT = 3_000_000  # card-test-Q8_0.gguf (4.3 MB) is split, card-test-Q4_K_M.gguf (2.5 MB) is not


@pytest.fixture(scope="module")
def built(tmp_path_factory, toolchain) -> RunDir:
    """A real run (imatrix, Q4_K_M and Q8_0, card) of the demo recipe at test size; tests publish copies of it."""
    _, run = build_run(tmp_path_factory.mktemp("publish"), toolchain)
    return run


@pytest.fixture
def run(built, tmp_path) -> RunDir:
    shutil.copytree(built.root, tmp_path / "run")
    return RunDir(tmp_path / "run")


@pytest.fixture
def hub(tmp_path, monkeypatch, toolchain):
    """A started loopback hub; huggingface_hub pointed at it with TOKEN in HF_TOKEN and no saved login."""
    from huggingface_hub import constants

    server = HubServer(tmp_path / "hub", token=TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("MTPQUANT_LLAMA_CPP", str(toolchain.bin_dir))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login" / "token"))
    for name in ("HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


def writes(server: HubServer) -> list[tuple[str, str]]:
    return [(m, p) for m, p in server.requests if any(w in p for w in WRITES)]


def hub_files(server: HubServer, repo: str = REPO) -> dict[str, dict]:
    data = server.load(repo)
    return data["commits"][data["branches"]["main"]]["files"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under a folder with its sha256 (to prove nothing was written)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def expected_paths(run: RunDir) -> set[str]:
    sums = run.read_sha256sums()
    tensor_types = {f"work/{p.name}" for p in (run.root / "work").glob("*.tensor-types.txt")}
    receipts = {f"receipts/{p.name}" for p in run.receipts.glob("*.json")}
    return set(sums) | tensor_types | receipts | {"SHA256SUMS", "manifest.json", "README.md"}


# ----------------------------------------------------------------------------------------------- happy path

def test_publish_then_rerun_uploads_nothing(run, hub):
    report = pub.publish_run(run.root, REPO)
    assert not report.repo_existed and report.transfer == "lfs" and report.commit
    assert {f.path for f in report.uploaded} == expected_paths(run) and report.unchanged == ()
    assert "receipts/publish.json" in expected_paths(run)
    files = hub_files(hub)
    assert set(files) == expected_paths(run) | {".gitattributes"}
    for f in report.files:
        assert files[f.path]["sha256"] == sha256_file(run.root / f.path) == f.sha256
    assert report.checked == len(report.files)
    for name in run.read_sha256sums():
        assert files[name]["lfs"]  # GGUFs are LFS files, so the hub's listing carries their sha256
    verify_run(run.root)  # the card now lists receipts/publish.json and still verifies
    commits = len(hub.load(REPO)["commits"])

    hub.requests.clear()
    again = pub.publish_run(run.root, REPO)
    assert again.uploaded == () and {f.path for f in again.unchanged} == expected_paths(run)
    assert writes(hub) == [] and len(hub.load(REPO)["commits"]) == commits
    assert again.commit == report.commit and again.repo_existed
    history = json.loads((run.logs / "publish.json").read_text())["history"]
    assert [h["commit"] for h in history] == [report.commit, report.commit]
    assert history[1]["uploaded"] == [] and history[0]["endpoint"] == hub.url


def test_publish_receipt_lists_artifacts_and_support_files(run, hub):
    pub.publish_run(run.root, REPO)
    receipt = receipt_json(run, "publish")
    sums = run.read_sha256sums()
    assert receipt["repo"] == REPO and receipt["split_max_size"] == pub.DEFAULT_SPLIT_MAX_SIZE
    assert {name: a["sha256"] for name, a in receipt["artifacts"].items()} == sums
    assert all(a["path"] == name and a["shards"] == [] for name, a in receipt["artifacts"].items())
    imatrix = receipt_json(run, "imatrix")["file"]
    assert receipt["artifacts"][imatrix]["kind"] == "imatrix"
    listed = {f["path"]: f["sha256"] for f in receipt["files"]}
    assert set(listed) == {"SHA256SUMS", "manifest.json", "work/Q4_K_M.tensor-types.txt",
                           "work/Q8_0.tensor-types.txt"}
    assert all(sha256_file(run.root / p) == sha for p, sha in listed.items())
    card = (run.root / "README.md").read_text()
    assert f"| `receipts/publish.json` | publish | – | `{sha256_file(run.receipts / 'publish.json')}` |" in card


def test_published_repo_downloads_byte_for_byte_and_verifies(run, hub, tmp_path):
    from huggingface_hub import snapshot_download

    pub.publish_run(run.root, REPO)
    got = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "dl-cache"))
    assert {p for p in snapshot(got) if p != ".gitattributes"} == expected_paths(run)
    for path, sha in snapshot(got).items():
        if path != ".gitattributes":
            assert sha == sha256_file(run.root / path), path
    # anyone holding the published files can re-check them (measurement receipts, card, headers)
    folder = tmp_path / "downloaded"
    shutil.copytree(got, folder)
    assert verify_run(folder).checks[-1].startswith("README.md: identical to a fresh rendering")


def test_private_repo(run, hub, tmp_path):
    from huggingface_hub import HfApi, errors

    report = pub.publish_run(run.root, REPO, private=True)
    assert hub.load(REPO)["private"] is True and report.private
    with pytest.raises(errors.RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info(REPO).private is True


def test_saved_login_token_is_used(run, hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    saved = tmp_path / "hf-home" / "token"
    saved.parent.mkdir()
    saved.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    monkeypatch.delenv("HF_TOKEN")
    assert pub.publish_run(run.root, REPO).commit


def test_progress_reaches_the_total(run, hub):
    seen: dict[str, list[tuple[int, int]]] = {}
    pub.publish_run(run.root, REPO, progress=lambda label, done, total: seen.setdefault(label, []).append(
        (done, total)))
    upload = seen[f"upload {REPO}"]
    total = sum((run.root / p).stat().st_size for p in expected_paths(run))
    assert upload[0] == (0, total) and upload[-1] == (total, total)
    assert [d for d, _ in upload] == sorted(d for d, _ in upload)
    assert seen["sha256"][-1][0] == seen["sha256"][-1][1]  # verify's own progress comes through


def test_private_flag_does_not_change_an_existing_public_repo(run, hub):
    hub.create_repo(REPO, initial_commit=True)
    report = pub.publish_run(run.root, REPO, private=True)
    assert report.notes == (f"{REPO} exists and is public: --private does not change an existing repo",)
    assert hub.load(REPO)["private"] is False


def test_existing_repo_gets_only_what_changed(run, hub):
    hub.commit(REPO, {"README.md": b"# an older card\n", "notes.txt": b"kept\n"})
    report = pub.publish_run(run.root, REPO)
    assert report.repo_existed
    assert report.notes == ("on the hub but not part of this run (left as they are): notes.txt",)
    assert hub_files(hub)["README.md"]["sha256"] == sha256_file(run.root / "README.md")


# ----------------------------------------------------------------------------------------------- splitting

def test_artifact_over_the_limit_is_split_and_the_shards_are_proven(run, hub, tmp_path):
    from huggingface_hub import snapshot_download

    big = "card-test-Q8_0.gguf"
    report = pub.publish_run(run.root, REPO, split_max_size=SPLIT_AT)
    shards = report.shards[big]
    n = len(shards)
    assert list(report.shards) == [big] and n >= 2
    assert shards == [f"card-test-Q8_0/card-test-Q8_0-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    files = hub_files(hub)
    assert big not in files and "card-test-Q4_K_M.gguf" in files and all(s in files for s in shards)
    assert all(files[s]["size"] <= SPLIT_AT for s in shards)
    receipt = receipt_json(run, "publish")["artifacts"][big]
    assert receipt["path"] is None and [s["path"] for s in receipt["shards"]] == shards
    assert [s["sha256"] for s in receipt["shards"]] == [files[s]["sha256"] for s in shards]
    assert receipt["sha256"] == run.read_sha256sums()[big]
    verify_run(run.root)  # split/ and the receipt leave the run verifiable

    # the downloaded shards hold the verified artifact's metadata and tensor bytes, and the copy verifies
    got = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "dl-cache"))
    pub.check_shards(run.root / big, [got / s for s in shards])
    folder = tmp_path / "downloaded"
    shutil.copytree(got, folder)
    assert not (folder / big).exists()
    verify_run(folder)

    # a re-run keeps the shards (no second split) and uploads nothing
    log = run.logs / "split-card-test-Q8_0.log"
    runs = log.read_text().count("$ ")
    hub.requests.clear()
    again = pub.publish_run(run.root, REPO, split_max_size=SPLIT_AT)
    assert again.uploaded == () and writes(hub) == [] and log.read_text().count("$ ") == runs


def test_changed_shard_is_refused(run, hub, toolchain):
    big = "card-test-Q8_0.gguf"
    src = run.root / big
    parts = pub.split_artifact(toolchain, run, big, run.read_sha256sums()[big], SPLIT_AT)
    local = [p.local for p in parts]
    flip_byte(local[1], local[1].stat().st_size - 1)
    with pytest.raises(VerifyError) as ei:
        pub.check_shards(src, local)
    assert ei.value.message.startswith(f"{local[1].name}: the bytes of tensor ")
    assert ei.value.message.endswith(f" differ from {big}")


def test_dry_run_names_the_shards_a_split_would_make(run, hub):
    before = snapshot(run.root)
    report = pub.publish_run(run.root, REPO, dry_run=True, split_max_size=SPLIT_AT)
    made = [f for f in report.files if f.action == "make"]
    shards = report.shards["card-test-Q8_0.gguf"]
    assert [f.path for f in made] == shards + ["receipts/publish.json", "README.md"]
    assert all(f.sha256 is None and f.local is None for f in made)
    assert snapshot(run.root) == before and not (run.root / "split").exists()
    assert writes(hub) == [] and hub.load(REPO) is None
    # the real run makes exactly those shards
    assert pub.publish_run(run.root, REPO, split_max_size=SPLIT_AT).shards["card-test-Q8_0.gguf"] == shards


# ----------------------------------------------------------------------------------------------- dry run and CLI

def test_dry_run_prints_every_file_and_changes_nothing(run, hub):
    before = snapshot(run.root)
    result = CliRunner().invoke(main, ["publish", str(run.root), "--repo", REPO, "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "dry run: nothing is uploaded and nothing is created"
    assert lines[1] == f"repo {REPO} on {hub.url}: would be created"
    for name, sha in run.read_sha256sums().items():
        size = (run.root / name).stat().st_size
        assert any(ln.split() == ["would", "upload", name, f"{size:,}", "B", "sha256", sha] for ln in lines), name
    assert [ln.split()[2] for ln in lines if ln.startswith("  would make ")] == ["receipts/publish.json",
                                                                                 "README.md"]
    known = sum((run.root / p).stat().st_size for p in expected_paths(run) - {"README.md"})
    assert lines[-1] == (f"{len(expected_paths(run)) + 1} file(s) ({known:,} bytes known) would be uploaded "
                         f"to {hub.url}/{REPO}, 0 are there unchanged")
    assert snapshot(run.root) == before
    assert writes(hub) == [] and hub.load(REPO) is None


def test_dry_run_after_publish_shows_everything_unchanged(run, hub):
    pub.publish_run(run.root, REPO)
    report = pub.publish_run(run.root, REPO, dry_run=True)
    assert report.uploaded == () and len(report.unchanged) == len(expected_paths(run))


def test_cli_json_report(run, hub):
    result = CliRunner().invoke(main, ["publish", str(run.root), "--repo", REPO, "--json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["repo"] == REPO and data["url"] == f"{hub.url}/{REPO}" and data["dry_run"] is False
    assert {f["path"] for f in data["files"]} == expected_paths(run)
    assert all(f["action"] == "upload" for f in data["files"]) and data["checked"] == len(data["files"])


@pytest.mark.parametrize("given,bytes_", [("50G", 50 * 10**9), ("1500M", 1_500_000_000), ("3000000", 3_000_000),
                                          ("2mb", 2_000_000)])
def test_split_size_option(given, bytes_):
    from mtpquant.cli.cmd_publish import SizeType

    assert SizeType().convert(given, None, None) == bytes_


def test_publish_help():
    result = CliRunner().invoke(main, ["publish", "--help"])
    assert result.exit_code == 0 and "--repo OWNER/NAME" in result.output and "--dry-run" in result.output


# ----------------------------------------------------------------------------------------------- refusals

def test_tampered_artifact_is_refused_and_nothing_is_sent(run, hub):
    name = "card-test-Q4_K_M.gguf"
    want = run.read_sha256sums()[name]
    flip_byte(run.root / name, 100)
    got = sha256_file(run.root / name)
    before = snapshot(run.root)
    with pytest.raises(VerifyError) as ei:
        pub.publish_run(run.root, REPO)
    assert ei.value.message == f"not published: {name}: sha256 is {got}, SHA256SUMS says {want}"
    assert hub.requests == [] and hub.load(REPO) is None and snapshot(run.root) == before


@pytest.mark.parametrize("repo", ["card-test", "me/model/extra", "me/bad name", "me/", "/model", "me/a--b",
                                  "me/" + "x" * 97])
def test_malformed_repo_id(run, hub, repo):
    with pytest.raises(UsageError) as ei:
        pub.publish_run(run.root, repo)
    assert ei.value.one_line() == (
        f"{repo!r} is not a Hugging Face repo id (give OWNER/NAME, e.g. my-org/Model-MTP-GGUF: letters, digits, "
        "'-', '_' and '.', at most 96 each)")
    assert hub.requests == []


def test_missing_run_dir(hub, tmp_path):
    with pytest.raises(UsageError) as ei:
        pub.publish_run(tmp_path / "nope", REPO)
    assert ei.value.one_line() == f"{tmp_path / 'nope'}: no such run directory (give the folder `mtpquant build` wrote)"
    assert hub.requests == []


def test_folder_that_is_not_a_run(hub, tmp_path):
    with pytest.raises(UsageError) as ei:
        pub.publish_run(tmp_path, REPO)
    assert ei.value.message == f"{tmp_path}: not a run directory (no receipts/)"
    assert hub.requests == [] and not (tmp_path / "receipts").exists()


def test_unreachable_endpoint(run, hub):
    url = hub.url
    hub.stop()
    before = snapshot(run.root)
    with pytest.raises(PublishError) as ei:
        pub.publish_run(run.root, REPO)
    assert ei.value.one_line() == (f"cannot reach {url} to check the token ([Errno 111] Connection refused); nothing "
                                   "was uploaded (check the network and HF_ENDPOINT, then run again)")
    assert snapshot(run.root) == before


def test_refused_token(run, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    before = snapshot(run.root)
    with pytest.raises(PublishError) as ei:
        pub.publish_run(run.root, REPO)
    assert ei.value.one_line() == (
        f"{hub.url} refused the token in HF_TOKEN (HTTP 401: Invalid credentials in Authorization header); nothing "
        "was uploaded (set HF_TOKEN or run `hf auth login` with a token that can write to mtpquant-test)")
    assert writes(hub) == [] and hub.load(REPO) is None and snapshot(run.root) == before


def test_no_token(run, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError) as ei:
        pub.publish_run(run.root, REPO)
    assert ei.value.one_line() == (
        "no Hugging Face token: HF_TOKEN is not set and there is no saved login (set HF_TOKEN or run `hf auth login` "
        "with a token that can write to mtpquant-test)")
    assert writes(hub) == [] and hub.load(REPO) is None


def test_cli_error_is_one_line_with_exit_code(run, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    result = CliRunner().invoke(main, ["publish", str(run.root), "--repo", REPO])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {hub.url} refused the token in ")


def test_hub_reporting_another_sha256_is_an_error_naming_the_file(run, hub):
    name = "card-test-Q4_K_M.gguf"
    wrong = "0" * 64

    def damage(repo: str, sha: str) -> None:  # the hub records other bytes than were sent
        data = hub.load(repo)
        data["commits"][sha]["files"][name]["sha256"] = wrong
        hub.save(repo, data)

    hub.on_commit = damage
    with pytest.raises(VerifyError) as ei:
        pub.publish_run(run.root, REPO)
    commit = hub.load(REPO)["branches"]["main"]
    assert ei.value.message == (f"{name}: the hub has sha256 {wrong} at {REPO}@{commit[:12]}, the run directory has "
                                f"{run.read_sha256sums()[name]}")


# ----------------------------------------------------------------------------------------------- failures and resume

def test_failed_upload_resumes_without_sending_blobs_again(run, hub):
    big = "card-test-Q8_0.gguf"
    sha = run.read_sha256sums()[big]
    hub.faults.append(Fault("PUT", f"/lfs-upload/.*/{sha}$", Reply.error(400, None, "injected")))
    with pytest.raises(PublishError) as ei:
        pub.publish_run(run.root, REPO)
    assert ei.value.one_line() == (f"uploading {big} to {REPO} failed (HTTP 400: injected); no commit was made (run "
                                   "again: blobs the hub already holds are not sent again)")
    assert set(hub_files(hub)) == {".gitattributes"}  # no commit
    stored = {p.name for p in (hub.root / REPO / "objects").iterdir()}
    hub.requests.clear()
    report = pub.publish_run(run.root, REPO)
    sent = {p.rsplit("/", 1)[1] for m, p in hub.requests if m == "PUT"}
    assert sent == {sha} and not sent & stored
    assert {f.path for f in report.uploaded} == expected_paths(run)


def test_transient_server_error_is_retried(run, hub):
    hub.faults.append(Fault("PUT", "/lfs-upload/", Reply.error(503, None, "try later")))
    report = pub.publish_run(run.root, REPO)
    assert report.checked == len(expected_paths(run))


# ----------------------------------------------------------------------------------------------- the token

def test_token_never_appears_in_output_logs_or_files(run, hub, monkeypatch, caplog, capfd):
    from huggingface_hub.utils import logging as hf_logging

    caplog.set_level(logging.DEBUG)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_debug()  # huggingface_hub's own log lines (its handler writes to stderr)
    try:
        runner = CliRunner()
        outputs = [runner.invoke(main, ["publish", str(run.root), "--repo", REPO, *args]).output
                   for args in (["--dry-run"], [], ["--json"], ["--split-max-size", str(SPLIT_AT)])]
        monkeypatch.setenv("HF_TOKEN", TOKEN + "x")  # a refused token is not shown either
        outputs.append(runner.invoke(main, ["publish", str(run.root), "--repo", REPO]).output)
    finally:
        hf_logging.set_verbosity(verbosity)
    captured = capfd.readouterr()
    assert "refused the token in HF_TOKEN" in outputs[-1]
    for text in [*outputs, caplog.text, captured.out, captured.err]:
        assert TOKEN not in text
    for p in run.root.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    for p in (hub.root / REPO).rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    assert writes(hub)  # the token was used: the hub accepted the uploads


# ----------------------------------------------------------------------------------------------- no token, links out

NEEDS_TOKEN = ("a real run also needs a Hugging Face token that can write to mtpquant-test (there is none here: set "
               f"HF_TOKEN or run `hf auth login`); without one, a private {REPO} would look absent here")


def test_dry_run_needs_no_token_and_says_what_a_real_run_needs(run, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    before = snapshot(run.root)
    result = CliRunner().invoke(main, ["publish", str(run.root), "--repo", REPO, "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:2] == ["dry run: nothing is uploaded and nothing is created",
                         f"repo {REPO} on {hub.url}: would be created"]
    assert f"note: {NEEDS_TOKEN}" in lines
    assert lines[-1].startswith(f"{len(expected_paths(run)) + 1} file(s) (")
    assert snapshot(run.root) == before and writes(hub) == [] and hub.load(REPO) is None
    assert not [p for _, p in hub.requests if p.startswith("/api/whoami")]
    with pytest.raises(PublishError) as ei:  # a real run does need one
        pub.publish_run(run.root, REPO)
    assert ei.value.message.startswith("no Hugging Face token: ")
    # a public repo reads without a token: the dry run sees what it already holds
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pub.publish_run(run.root, REPO)
    monkeypatch.delenv("HF_TOKEN")
    report = pub.publish_run(run.root, REPO, dry_run=True)
    assert report.repo_existed and report.uploaded == () and report.notes == (NEEDS_TOKEN,)


@pytest.mark.parametrize("name", ["card-test-Q4_K_M.gguf", "receipts/card.json", "README.md"])
def test_a_file_linking_out_of_the_run_is_not_published(run, hub, tmp_path, name):
    elsewhere = tmp_path / "elsewhere" / Path(name).name
    elsewhere.parent.mkdir()
    shutil.move(run.root / name, elsewhere)
    (run.root / name).symlink_to(elsewhere)
    before = snapshot(run.root)
    message = (f"not published: {name}: a symbolic link to {elsewhere}, outside the run directory (only files of the "
               "run directory may leave the machine: put the file itself there, not a link)")
    for dry_run in (True, False):
        with pytest.raises(VerifyError) as ei:
            pub.publish_run(run.root, REPO, dry_run=dry_run)
        assert ei.value.one_line() == message
    result = CliRunner().invoke(main, ["publish", str(run.root), "--repo", REPO])
    assert (result.exit_code, result.output) == (1, f"error: {message}\n")
    assert hub.requests == [] and hub.load(REPO) is None and snapshot(run.root) == before
