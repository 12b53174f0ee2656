"""`mtpquant publish`: the steps in order, from the repo id to the hub's sha256s of what it holds."""

from __future__ import annotations

import contextlib
from pathlib import Path

from mtpquant.core.errors import GateError, UsageError, VerifyError
from mtpquant.core.files import plain_json, write_text_atomic
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import PublishReceipt
from mtpquant.core.rundir import RunDir, locked
from mtpquant.hub.client import settings
from mtpquant.report import audit, card
from mtpquant.report.audit.artifacts import check_inside
from mtpquant.report.publish.hub import Hub, RemoteState, check_repo_id, quiet_hub
from mtpquant.report.publish.plan import PlannedFile, receipt_body, repo_files
from mtpquant.report.publish.remote import check_remote, mark_unchanged
from mtpquant.report.publish.report import PublishReport, record
from mtpquant.report.publish.split import DEFAULT_SPLIT_MAX_SIZE, SPLIT_UNIT, artifact_files

HUB_MADE = (".gitattributes",)  # written by the hub when it creates a repo
DRY_RUN_NEEDS = ("a real run also needs a Hugging Face token that can write to {owner} (there is none here: set "
                 "HF_TOKEN or run `hf auth login`); without one, a private {repo} would look absent here")


def publish_run(run_dir: Path, repo: str, private: bool = False, dry_run: bool = False, token: str | None = None,
                progress: ProgressFn = no_progress, split_max_size: int = DEFAULT_SPLIT_MAX_SIZE, toolchain=None,
                endpoint: str | None = None) -> PublishReport:
    """Verify, split what is over the per-file limit, upload what the repo lacks, and check the hub's sha256s."""
    repo = check_repo_id(repo)
    if split_max_size < 2 * SPLIT_UNIT:
        raise UsageError(f"split_max_size {split_max_size} bytes is too small",
                         f"give at least {2 * SPLIT_UNIT} bytes (llama-gguf-split counts in megabytes)")
    root = Path(run_dir).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"{run_dir}: no such run directory", "give the folder `mtpquant build` wrote")
    cfg = settings()
    if cfg.offline:
        raise UsageError("HF_HUB_OFFLINE is set and publishing needs the hub", "unset HF_HUB_OFFLINE")
    run = RunDir(root)
    lock = locked(run) if not dry_run and run.receipts.is_dir() else contextlib.nullcontext()
    with lock:
        try:
            verified = audit.verify_run(root, progress=progress)
        except VerifyError as exc:
            raise VerifyError(f"not published: {exc.message}", exc.hint) from None
        except GateError as exc:  # nothing gated out is published, not even as a dry run
            raise GateError(f"not published: {exc.message}", exc.hint) from None
        hub = Hub(endpoint or cfg.endpoint, repo, token)
        with quiet_hub():
            return _publish(run, hub, verified.artifacts, private, dry_run, split_max_size, toolchain, progress)


def _publish(run: RunDir, hub: Hub, sums: dict[str, str], private: bool, dry_run: bool, limit: int, toolchain,
             progress: ProgressFn) -> PublishReport:
    # before the hub is asked anything or a file is written: the run's own files, none a link leading out of it
    refuse_outside(run.root, [run.root / n for n in (*sums, "SHA256SUMS", "manifest.json", card.CARD_FILE)]
                   + sorted(run.receipts.glob("*.json")))
    notes = []
    if dry_run and not hub.has_token:  # a dry run uploads nothing, so it plans what it can without one
        notes.append(DRY_RUN_NEEDS.format(owner=hub.owner, repo=hub.repo))
    else:
        hub.check_token()
    remote = hub.state()
    if remote is not None and private and not remote.private:
        notes.append(f"{hub.repo} exists and is public: --private does not change an existing repo")
    artifacts, shards, made = artifact_files(run, sums, limit, dry_run, toolchain, progress)
    pending = _update_receipt(run, hub.repo, limit, artifacts, shards, write=not dry_run and not made) or made
    files = tuple(mark_unchanged(f, remote) for f in repo_files(run, artifacts, shards, pending=pending))
    refuse_outside(run.root, [f.local for f in files if f.local is not None])  # shards and tensor-type files too
    extra = sorted(set(remote.files) - {f.path for f in files} - set(HUB_MADE)) if remote else []
    if extra:
        notes.append(f"on the hub but not part of this run (left as they are): {', '.join(extra)}")
    shard_paths = {a: [s.path for s in ss] for a, ss in shards.items()}
    existed = remote is not None
    if dry_run:
        return PublishReport(run.root, hub.repo, hub.endpoint, True, private, existed, None, files,
                             shard_paths, None, 0, tuple(notes))
    transfer, commit = _upload(run, hub, files, remote, private, progress)
    checked = check_remote(hub, commit, files)
    report = PublishReport(run.root, hub.repo, hub.endpoint, False, private, existed, transfer, files,
                           shard_paths, commit, checked, tuple(notes))
    record(run, report)
    return report


def refuse_outside(root: Path, paths: list[Path]) -> None:
    """Refuse, before anything is sent, a file to publish that is a link leading out of the run directory."""
    for path in paths:
        if path.exists() or path.is_symlink():
            try:
                check_inside(root, path)
            except VerifyError as exc:
                raise VerifyError(f"not published: {exc.message}", exc.hint) from None


def _update_receipt(run: RunDir, repo: str, limit: int, artifacts: list[PlannedFile],
                    shards: dict[str, list[PlannedFile]], write: bool) -> bool:
    """Bring receipts/publish.json, and the card that lists it, up to date if `write`; whether it is still due."""
    body = receipt_body(repo, limit, artifacts, shards, run)
    previous = run.read(PublishReceipt, stale_ok=True)
    changed = previous is None or plain_json(previous.body()) != plain_json(body)
    if changed and write:
        run.write(PublishReceipt(**body))
        # README.md again from the receipts (which now include publish.json), without touching receipts/card.json
        write_text_atomic(run.root / card.CARD_FILE, card.render_card(run))
        return False
    return changed


def _upload(run: RunDir, hub: Hub, files: tuple[PlannedFile, ...], remote: RemoteState | None, private: bool,
            progress: ProgressFn) -> tuple[str | None, str | None]:
    """(transfer, commit): the files the hub lacks sent in one commit, creating the repo if it is new."""
    todo = [f for f in files if f.action == "upload"]
    if not todo:
        return None, remote.head if remote else None
    if remote is None:
        hub.create(private)
        remote = hub.state()
    transfer = hub.transfer()
    name = run.read_manifest().get("name") or run.root.name
    return transfer, hub.upload(todo, remote.head, name, transfer, progress)
