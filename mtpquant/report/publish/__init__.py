"""`mtpquant publish`: a verified run directory to a Hugging Face model repo, resumable, and checked on the hub.

Order: the repo id, then `verify` (a run that does not verify is never sent), then read-only questions to the hub (the
token, the repo, what it holds), then the local preparation (artifacts over the per-file limit split with
llama-gguf-split into shards proven to hold the artifact's metadata and tensor bytes; receipts/publish.json; the card
re-rendered so it lists that receipt), then the upload: every new or changed blob first (the hub keeps the blobs it
has, so a re-run after Ctrl-C or a failure sends only what is missing), then one commit, then the hub's sha256 of every
file compared with the run directory.

receipts/publish.json is written before the upload and travels with it, so it cannot name the commit it lands in
(nor the card, which lists it): the commit, the endpoint and the post-upload check go to logs/publish.json, which
stays local.
"""

from mtpquant.report.publish.hub import RESUME_HINT, check_repo_id
from mtpquant.report.publish.plan import PlannedFile
from mtpquant.report.publish.report import PublishReport
from mtpquant.report.publish.run import publish_run
from mtpquant.report.publish.split import DEFAULT_SPLIT_MAX_SIZE, check_shards, split_artifact

__all__ = ["DEFAULT_SPLIT_MAX_SIZE", "RESUME_HINT", "PlannedFile", "PublishReport", "check_repo_id", "check_shards",
           "publish_run", "split_artifact"]
