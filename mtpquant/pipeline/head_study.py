"""The draft-head study as a build step: for each variant with `draft_head`, every candidate head is made by
llama-quantize exactly as the variant would be (its own policy, plus a first rule giving the head's tensors the
candidate type, so the trunk is identical), its MTP acceptance is measured against the reference head's on the
same prompts, and the variant is planned again with the chosen type as its first rule. The published file is then
an ordinary quantize output, and it is byte for byte the candidate that was measured."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import gguf

from mtpquant.core.errors import MtpquantError, PlanError
from mtpquant.core.files import atomic_path, free_bytes, incomplete_path, sha256_file, sha256_json
from mtpquant.core.progress import ProgressFn
from mtpquant.core.receipts import DraftHeadReceipt
from mtpquant.core.steps import Step, run_step
from mtpquant.llamacpp.imatrix import ImatrixResult
from mtpquant.llamacpp.quantize import run_quantize
from mtpquant.measure import draft_head as dh
from mtpquant.measure.smoke import acceptance
from mtpquant.measure.smoke.suite import select_prompts, suite_info
from mtpquant.pipeline.plan import DISK_MARGIN, Plan
from mtpquant.quant import coverage as imx
from mtpquant.quant.keys import quantize_key
from mtpquant.quant.plan import VariantPlan, plan_variant
from mtpquant.quant.policy import IMATRIX_REQUIRED, rule_matches
from mtpquant.quant.verify import verify_output
from mtpquant.recipe import Rule, Variant
from mtpquant.recipe.schema import DraftHeadSpec

EH_PROJ_MATCH = r"nextn\.eh_proj\.weight$"
STUDY_DIR = "draft-head"  # under work/: the candidates' plans, tensor-type files and (while measured) files
MADE = ("each candidate is a whole llama-quantize run of the variant: its type, its own policy and imatrix, plus a "
        "first rule giving the head's tensors the candidate type; every other tensor's type is checked to be the "
        "variant's own, so only the head differs. The chosen rule then becomes the variant's first policy rule and "
        "the quantize step makes the published file, whose sha256 is the measured candidate's.")


def head_rule(scope: str, ggml_type: str, origin: str) -> Rule:
    """The rule giving the head's tensors a type: nextn.eh_proj, or every quantizable tensor of the NextN block."""
    return Rule(type=ggml_type, match=EH_PROJ_MATCH if scope == "eh_proj" else None, block="nextn", origin=origin)


def run_studies(plan: Plan, im: ImatrixResult | None, force: bool, progress: ProgressFn) -> tuple[Plan, dict]:
    """Study every variant that asks for it; the plan with those variants planned again with the chosen head, and
    what the manifest says of each study."""
    studied = [v for v in plan.variants if v.variant.draft_head is not None]
    if not studied:
        return plan, {}
    _check_disk(plan, studied)
    steps, variants = {}, []
    for vplan in plan.variants:
        if vplan.variant.draft_head is None:
            variants.append(vplan)
            continue
        done = run_step(plan.run, study_step(plan, vplan, im, progress), force)
        receipt: DraftHeadReceipt = done.receipt
        variants.append(plan_with_head(plan, vplan, receipt.choice["type"], receipt_origin(vplan.variant.tag)))
        steps[f"draft-head:{vplan.variant.tag}"] = {**done.manifest_entry(), "choice": receipt.choice["type"],
                                                    "outcome": receipt.choice["outcome"]}
    return dataclasses.replace(plan, variants=tuple(variants)), steps


def receipt_origin(tag: str) -> str:
    """Where the chosen head rule comes from, as plans and messages name it."""
    return f"receipts/draft-head-{tag}.json"


def plan_with_head(plan: Plan, vplan: VariantPlan, ggml_type: str, origin: str, label: str | None = None,
                   file_name: str | None = None, work: Path | None = None,
                   imatrix: tuple[set[str], Path] | None = None) -> VariantPlan:
    """The variant planned with the head rule first; rules it makes redundant (they match only head tensors) are
    left out, since a rule that takes no tensor is an error. `imatrix`: (covered weights, file for the dry runs)
    in place of the plan's."""
    v, model = vplan.variant, plan.source.info
    rule = head_rule(v.draft_head.scope, ggml_type, origin)
    variant = Variant(v.type, (rule, *_not_superseded(v.rules, rule, model)), v.label if label is None else label,
                      v.draft_head)
    covered, dry_file = imatrix or (None if plan.imatrix.covered is None else set(plan.imatrix.covered),
                                    plan.imatrix.dry_run_file)
    return plan_variant(plan.toolchain, plan.source.path, model, variant,
                        _not_superseded(plan.recipe.policy, rule, model), file_name or vplan.file_name,
                        work or plan.run.work, covered, plan.recipe.imatrix.uncovered, plan.recipe.imatrix.pin_type,
                        dry_file)


def _not_superseded(rules: tuple[Rule, ...], head: Rule, model) -> tuple[Rule, ...]:
    taken = {t.name for t in model.tensors if rule_matches(head, t, model)}
    kept = []
    for r in rules:
        matched = {t.name for t in model.tensors if rule_matches(r, t, model)}
        if not matched or not matched <= taken:
            kept.append(r)
    return tuple(kept)


def scope_tensors(plan: Plan, vplan: VariantPlan) -> list[str]:
    """The head's tensors a candidate type is given to: those of the scope that llama-quantize quantizes."""
    model = plan.source.info
    rule = head_rule(vplan.variant.draft_head.scope, "Q8_0", "scope")
    names = {t.name for t in model.tensors if rule_matches(rule, t, model)}
    return [t.name for t in vplan.tensors if t.name in names and t.default_type != t.source_type]


def reference_type(plan: Plan, vplan: VariantPlan, scope: list[str]) -> str:
    """Q8_0, or the source's own type of the head's tensors (`reference: source`)."""
    spec = vplan.variant.draft_head
    if spec.reference != "source":
        return spec.reference
    types = sorted({t.source_type for t in vplan.tensors if t.name in scope})
    if len(types) != 1:
        raise PlanError(f"variant {vplan.variant.tag}: draft_head.reference source needs one source type for the "
                        f"head's tensors, they have {', '.join(types)}", "use reference: Q8_0")
    return types[0]


def _check_disk(plan: Plan, studied: list[VariantPlan]) -> None:
    # candidates are made and measured one at a time, each removed before the next
    need = max(v.total_bytes for v in studied) + DISK_MARGIN
    free = free_bytes(plan.run.work)
    if need > free:
        raise MtpquantError(f"not enough free disk in {plan.run.work} for the draft-head study: one candidate needs "
                            f"{need / (1 << 30):.2f} GiB, {free / (1 << 30):.2f} GiB is free",
                            "free some space or choose another --out")


def study_key(plan: Plan, vplan: VariantPlan, im: ImatrixResult | None, prompts: list, suite: dict) -> str:
    """What decides a study: the variant as planned before it, the study settings, prompts, tools, the method."""
    spec, smoke = vplan.variant.draft_head, plan.recipe.smoke
    server = plan.toolchain.recorded_sha256("llama-server")
    return sha256_json({
        "variant": quantize_key(plan.source.sha256, vplan.variant.type, list(vplan.overrides),
                                im.sha256 if im else None, plan.toolchain_key),
        "spec": dataclasses.asdict(spec), "prompts": [p.id for p in prompts], "suite": suite.get("sha256"),
        "server": {"llama_server": server, "threads": spec.threads or smoke.threads, "gpu_layers": smoke.gpu_layers},
        "version": DraftHeadReceipt.VERSION})


def study_step(plan: Plan, vplan: VariantPlan, im: ImatrixResult | None, progress: ProgressFn) -> Step:
    """The study of one variant as a Step: skipped while the variant, the settings and the tools are unchanged."""
    tag, spec = vplan.variant.tag, vplan.variant.draft_head
    suite, full = suite_info(None)
    prompts = select_prompts(full, spec.prompts)
    key = study_key(plan, vplan, im, prompts, suite)

    def study() -> DraftHeadReceipt:
        return _study(plan, vplan, im, spec, prompts, suite, key, progress)

    return Step(f"draft-head:{tag}", DraftHeadReceipt, tag, key, study)


@dataclass(frozen=True)
class _Arm:
    """One head to make and measure: its type, its plan, and the imatrix llama-quantize is given."""

    type: str
    label: str  # file-name tag: <variant>.head-<TYPE>[.unweighted]
    plan: VariantPlan
    imatrix: Path | None
    unweighted: bool = False


def _study(plan: Plan, vplan: VariantPlan, im: ImatrixResult | None, spec: DraftHeadSpec, prompts: list,
           suite: dict, key: str, progress: ProgressFn) -> DraftHeadReceipt:
    started = time.monotonic()
    tag = vplan.variant.tag
    scope = scope_tensors(plan, vplan)
    if not scope:
        raise PlanError(f"variant {tag}: draft_head.scope {spec.scope} names no tensor that llama-quantize quantizes",
                        "does the source keep its NextN block? `mtpquant inspect SOURCE` lists it")
    ref_type = reference_type(plan, vplan, scope)
    settings = acceptance.Settings(spec.k, spec.max_tokens, spec.slots, spec.threads or plan.recipe.smoke.threads,
                           plan.recipe.smoke.gpu_layers)
    types = list(dict.fromkeys([ref_type, *spec.candidates]))  # the reference first; a candidate may be it
    # every arm is planned (dry runs) before any is made: a candidate llama-quantize cannot make fails first
    planned = [_plan_arm(plan, vplan, t, scope, im.path if im else None) for t in types]
    unweighted, note = _unweighted_arms(plan, vplan, im, spec, scope) if spec.unweighted else ([], None)
    measured: dict[str, dict] = {}  # sha256 -> measurement: identical bytes are measured once
    arms = {a.label: _make_arm(plan, vplan, a, scope, im, prompts, settings, measured, progress)
            for a in [*planned, *unweighted]}
    by_type = {a.type: arms[a.label] for a in planned}
    ref = by_type[ref_type]
    if not ref["measured"]["drafted"]:
        raise MtpquantError(f"variant {tag}: the reference head ({ref_type}) drafted no token on {len(prompts)} "
                            "prompt(s), so there is no acceptance to compare",
                            f"read logs/{ref['measured']['log']}; does the source's NextN block draft at all?")
    candidates = [{**by_type[t], "is_reference": t == ref_type, **_against(ref, by_type[t], spec.tolerance_pp)}
                  for t in spec.candidates]
    choice = dh.choose(candidates, spec.tolerance_pp, ref_type)
    rule = head_rule(spec.scope, choice["type"], receipt_origin(tag))
    choice["rule"] = {"block": rule.block, "match": rule.match, "type": rule.type, "origin": rule.origin}
    choice["sha256"] = by_type[choice["type"]]["sha256"]
    return DraftHeadReceipt(
        input_key=key, variant_type=vplan.variant.type, settings=dataclasses.asdict(spec), scope_tensors=scope,
        made={"how": MADE, "base_overrides": list(vplan.overrides), "trunk_types_identical": True,
              "kept": False, "folder": f"work/{STUDY_DIR}"},
        imatrix={"sha256": im.sha256 if im else None, "file": im.path.name if im else None,
                 "head_path": by_type[choice["type"]]["head_path"]},
        measurement={**settings.to_json(), "prompts": [p.id for p in prompts], "suite": suite,
                     "bootstrap": {"resamples": dh.RESAMPLES, "rng": "numpy.random.default_rng",
                                   "rng_seed": dh.BOOTSTRAP_SEED, "interval": "percentile", "level": dh.LEVEL,
                                   "unit": "prompt (the same prompts for both heads)"},
                     "acceptance": "sum(draft_n_accepted) / sum(draft_n) over the prompts",
                     "loss": "100 * (reference acceptance - candidate acceptance), percentage points"},
        reference={"kind": spec.reference, **ref},
        candidates=candidates, choice=choice, toolchain=plan.toolchain.describe(),
        seconds=round(time.monotonic() - started, 3),
        unweighted=None if not spec.unweighted else _unweighted_record(
            unweighted, arms, by_type, ref, spec, note, plan, scope))


def _against(ref: dict, arm: dict, tolerance_pp: float) -> dict:
    """A head's paired loss against the reference, whether it qualifies, and on how many prompts it wrote the
    same text (the trunk decides the text; a difference would mean the trunk differs)."""
    loss = dh.paired_loss(ref["measured"]["per_prompt"], arm["measured"]["per_prompt"])
    same = sum(a["text_sha256"] == b["text_sha256"]
               for a, b in zip(ref["measured"]["per_prompt"], arm["measured"]["per_prompt"]))
    return {"loss_pp": loss, "qualifies": dh.qualifies(loss, tolerance_pp), "same_output_as_reference": same}


def _plan_arm(plan: Plan, vplan: VariantPlan, ggml_type: str, scope: list[str], imatrix: Path | None,
              unweighted: bool = False) -> _Arm:
    """The variant planned with the head at `ggml_type`, its trunk checked to be the variant's own."""
    label = f"{vplan.variant.tag}.head-{ggml_type}" + (".unweighted" if unweighted else "")
    folder = plan.run.work / STUDY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    covered = None
    if unweighted and plan.imatrix.covered is not None:
        covered = (set(plan.imatrix.covered) - set(scope), imatrix)
    cplan = plan_with_head(plan, vplan, ggml_type, f"draft_head.candidates ({ggml_type})", label=label,
                           file_name=f"{plan.recipe.name}-{label}.gguf", work=folder, imatrix=covered)
    _check_trunk(vplan, cplan, scope, ggml_type)
    return _Arm(ggml_type, label, cplan, imatrix, unweighted)


def _make_arm(plan: Plan, vplan: VariantPlan, arm: _Arm, scope: list[str], im: ImatrixResult | None,
              prompts: list, settings: acceptance.Settings, measured: dict, progress: ProgressFn) -> dict:
    """One head quantized, verified and measured (unless the same bytes were already), then removed."""
    run, cplan = plan.run, arm.plan
    folder = run.work / STUDY_DIR
    out = folder / cplan.file_name
    tmp = incomplete_path(out)
    try:
        # run in the run directory with relative paths, as the quantize step does: the same bytes as the variant
        q = run_quantize(plan.toolchain, plan.source.path.absolute(), _rel(tmp, run.root), vplan.variant.type,
                         f"draft head {arm.label}", _rel(folder / f"{arm.label}.tensor-types.txt", run.root),
                         _rel(arm.imatrix, run.root) if arm.imatrix else None, run.logs / f"draft-head-{arm.label}.log",
                         cwd=run.root, progress=progress)
        verify_output(tmp, cplan.types(), vplan.variant.type, plan.source.info, cplan.total_bytes)
        sha, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, out)
        fresh = sha not in measured
        if fresh:
            measured[sha] = acceptance.measure_head(plan.toolchain, out, prompts, settings,
                                            run.logs / f"draft-head-{arm.label}-server.log", progress,
                                            f"draft head {arm.label}")
    finally:
        tmp.unlink(missing_ok=True)
        out.unlink(missing_ok=True)  # reproducible from the receipt; the chosen one is remade as the variant
    m = measured[sha]
    head = {t.name: t for t in cplan.tensors if t.name in scope}
    info = None if arm.unweighted or im is None else im.info
    return {"type": arm.type, "file": out.name, "sha256": sha, "bytes": size, "tensor_bytes": cplan.total_bytes,
            "head_bytes": sum(t.bytes for t in head.values()), "head_types": {n: t.type for n, t in head.items()},
            "overrides": list(cplan.overrides),
            # as the quantize receipt records it: binary and source by name, the rest as run in the run directory
            "command": [Path(q.argv[0]).name, *q.argv[1:-4], plan.source.path.name, *q.argv[-3:]],
            "head_path": imx.DRAFT_UNWEIGHTED if arm.unweighted
            else imx.draft_head_path(plan.source.info, info, cplan.pins),
            "measured": m, "acceptance": m["acceptance"], "measured_again": fresh,
            "seconds": {"quantize": q.seconds, "measure": m["seconds"]["wall"] if fresh else 0.0,
                        "server_cpu": m["seconds"]["server_cpu"] if fresh else 0.0}}


def _unweighted_arms(plan: Plan, vplan: VariantPlan, im: ImatrixResult | None, spec: DraftHeadSpec,
                     scope: list[str]) -> tuple[list[_Arm], str | None]:
    """The candidates again, quantized with the head's importance data left out (the trunk keeps its own)."""
    if im is None:
        return [], "no imatrix: every candidate head is quantized without importance data already"
    if not set(scope) & set(im.info.entries):
        return [], f"{im.path.name} has no statistics for the head: every candidate is unweighted already"
    without = imatrix_without(im.path, scope, plan.run.work / STUDY_DIR / f"{im.path.stem}.no-head.gguf")
    types = [t for t in spec.candidates if t not in IMATRIX_REQUIRED]
    return [_plan_arm(plan, vplan, t, scope, without, unweighted=True) for t in types], None


def _unweighted_record(arms: list[_Arm], made: dict, by_type: dict, ref: dict, spec: DraftHeadSpec,
                       note: str | None, plan: Plan, scope: list[str]) -> dict:
    rows = []
    for a in arms:
        u, w = made[a.label], by_type[a.type]
        rows.append({**u, **_against(ref, u, spec.tolerance_pp), "calibrated_acceptance": w["acceptance"],
                     "vs_calibrated_pp": dh.paired_loss(w["measured"]["per_prompt"], u["measured"]["per_prompt"])})
    imatrix = None
    if arms:
        path = arms[0].imatrix
        imatrix = {"file": _rel(path, plan.run.root).as_posix(), "sha256": sha256_file(path), "without": scope}
    return {"note": note, "imatrix": imatrix, "arms": rows,
            "compared": "vs_calibrated_pp = calibrated acceptance - unweighted acceptance (pp, paired per prompt)"}


def imatrix_without(src: Path, names: list[str], dest: Path) -> Path:
    """A copy of an imatrix GGUF without the statistics of `names`: llama-quantize then quantizes those tensors
    unweighted (K-quants allow it) and every other tensor exactly as with the original."""
    reader = gguf.GGUFReader(src)
    drop = tuple(f"{n}." for n in names)
    with atomic_path(dest) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix", use_temp_file=False)
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
                continue
            sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub)
        for t in reader.tensors:
            if not t.name.startswith(drop):
                w.add_tensor(t.name, t.data.copy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dest


def _rel(path: Path, root: Path) -> Path:
    return Path(os.path.relpath(path, root))


def _check_trunk(base: VariantPlan, cand: VariantPlan, scope: list[str], ggml_type: str) -> None:
    """Only the head may differ from the variant's own plan."""
    inside = set(scope)
    want, got = base.types(), cand.types()
    differ = [f"{n} {want[n]} -> {got.get(n)}" for n in want if n not in inside and got.get(n) != want[n]]
    if differ:
        raise PlanError(f"variant {base.variant.tag}: the {ggml_type} head candidate would also change "
                        f"{len(differ)} trunk tensor(s): " + "; ".join(differ[:5]),
                        "the study compares heads with the trunk held identical; narrow draft_head.scope")
