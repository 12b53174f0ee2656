"""MTP smoke run: one GGUF in llama-server, speculation off vs draft-mtp at each k, prompt suite x seeds.

Smoke method: the receipts' SmokeReceipt.VERSION (3: identical explicit placement for every server, all servers
resident with the arms interleaved per request, full-length warm-up, best k chosen on half the prompts and reported
on the other half, speed only from requests that ran to max_tokens, BCa CIs over prompts and none below 10, gates
on the CI's lower bound at a fixed k). Figures (per category and overall):
  acceptance   = sum(draft_n_accepted) / sum(draft_n)   (a response without draft_n made 0 drafts)
  mean accepted length = sum(draft_n_accepted) / sum(verification steps)   (steps from /metrics deltas)
  tok/s        = mean of timings.predicted_per_second
  speedup      = geometric mean over units of MTP tok/s / vanilla tok/s for the same prompt and seed

suite: the prompts; requests: bodies and one timed request; stats: figures and CIs; aggregate: the figures of a
run; context: the context-length sweep (longtext: its long prompts); run: one model; gates: the recipe's
gates; run_dir: every model of a run.
"""

from mtpquant.core.rundir import Artifact
from mtpquant.measure.smoke.aggregate import mtp_group, summarize
from mtpquant.measure.smoke.gates import check_gates, gate_report, gates_for
from mtpquant.measure.smoke.requests import CHAT, WARMUP_TOKENS, build_requests, chat_body, send
from mtpquant.measure.smoke.run import smoke_model, spec_json
from mtpquant.measure.smoke.run_dir import run_spec, smoke_run
from mtpquant.measure.smoke.stats import bootstrap_ci, figure, mean, ratio_of_sums
from mtpquant.measure.smoke.suite import Prompt, load_suite, select_prompts

# What other layers and scripts/ use; Artifact and Prompt are the types smoke_run and smoke_model take.
__all__ = ["CHAT", "WARMUP_TOKENS", "Artifact", "Prompt", "bootstrap_ci", "build_requests", "chat_body",
           "check_gates", "figure", "gate_report", "gates_for", "load_suite", "mean", "mtp_group", "ratio_of_sums", "run_spec",
           "select_prompts", "send", "smoke_model", "smoke_run", "spec_json", "summarize"]
