"""`vepatch guard`: paired evaluation of baseline and candidate on the target holdout, every
guard suite and the pooled holdouts of earlier accepted versions; the acceptance rule
(acceptance.py, METHODS.md §3); the strength search over lambda (PAINT / WiSE-FT), tested
from the largest strength down, each at guard.alpha / the number of strengths, stopping at the
first that passes; promotion of that strength to vN."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
from scipy.stats import binomtest

from . import acceptance as rules
from . import captioning, clock, evidence, progress, store
from .context import Context, open_guard_suite
from .data import ImageSet, merge_sets, open_holdout
from .delta import Delta, apply_delta, patched_fingerprint, restore
from .evidence import Evidence, SuiteEvidence
from .evaluate import predict
from .models import LoadedModel
from .models.heads import text_head
from .models.towers import describe_tower
from .recipe import GuardSpec
from .retrieval import CAPTION_TEMPLATE, Row, query_sources, row_predictions, rows_for
from .records import UNGUARDED, ClassOutcome, GuardReport, PatchManifest, StrengthResult
from .runtime import distributed
from .runtime.passes import DEFAULT_BUDGET_BYTES, FEATURES, Budget, Measured, Predictions, Scores, SuiteInputs, outputs
from .runtime.predcache import PredictionCache, key


@dataclass
class Suite:
    name: str
    role: Literal["target", "guard"]
    images: ImageSet
    head: torch.Tensor
    max_drop_pp: float
    holdout: bool = False  # earlier versions' holdouts, pooled: always judged (they were fixes when accepted)
    row: Optional[Row] = None  # a retrieval suite's direction and K (head: its caption embeddings)
    group: str = ""  # the retrieval suite whose images this row ranks ('' = the suite's own name)
    templates: tuple[str, ...] = ()  # what `head` was made from (with the class names): a prompt patch remakes it
    caption: bool = False  # a captioning suite's row: each image's caption likelihood (captioning.py; `head` unused)

    @property
    def source(self) -> str:
        """The images this suite reads: rows of one retrieval suite share them (and one pass)."""
        return self.group or self.name


def with_heads(loaded: LoadedModel, suites: list[Suite]) -> list[Suite]:
    """The suites with their heads made again by `loaded`'s text side (a prompt patch changes
    them; the text heads' cache makes an unchanged one free)."""
    return [s if s.caption else dataclasses.replace(s, head=text_head(loaded, s.images.classnames, list(s.templates)))
            for s in suites]


def images_per_pass(suites: list[Suite]) -> int:
    """Images one pass over `suites` reads (a retrieval suite's rows read theirs once)."""
    return sum(len(s.images) for s in {s.source: s for s in suites}.values())


def evaluate_suites(suites: list[Suite], classify: Callable[[Suite], Predictions],
                    embed: Callable[[Suite], torch.Tensor], score: Callable[[Suite], Scores] | None = None) -> dict[str, Measured]:
    """Every suite's predictions under the model's current weights: `classify(s)` for a
    classification suite; for a retrieval suite, one `embed(s)` of its images ranked by every
    row; for a captioning suite, `score(s)`."""
    out: dict[str, Measured] = {}
    for s in suites:
        if s.name in out:
            continue
        if s.caption:
            out[s.name] = score(s)
            continue
        if s.row is None:
            out[s.name] = classify(s)
            continue
        features = embed(s)
        labels = np.asarray(s.images.labels, dtype=np.int64)
        for r in (r for r in suites if r.source == s.source):
            out[r.name] = row_predictions(features, r.head, labels, r.row)
    return out


def mcnemar_p(before: np.ndarray, after: np.ndarray) -> float:
    """Exact two-sided McNemar test on paired correctness (1.0 when nothing changed): the bench's
    "did it change either way"."""
    lost = int((before & ~after).sum())
    gained = int((~before & after).sum())
    if lost + gained == 0:
        return 1.0
    return float(binomtest(min(lost, gained), lost + gained, 0.5).pvalue)


def at_chance(suite: Suite, baseline: Predictions, alpha: float = 0.05) -> bool:
    """A recipe guard suite the baseline does not read better than chance (one-sided binomial
    test against 1/classes at `alpha`) guards nothing: its changes are noise."""
    n, k = len(baseline.labels), max(1, len(suite.images.classnames))
    if suite.role != "guard" or suite.holdout or suite.row is not None or suite.caption or n == 0:
        return False  # a retrieval row or a caption likelihood has no chance level of 1/classes
    return binomtest(int(baseline.correct.sum()), n, 1.0 / k, alternative="greater").pvalue >= alpha


def level_of(spec: GuardSpec) -> float:
    """The level each strength is tested at: guard.alpha split over the strengths the search may
    try (Bonferroni), so the verdict's error rates hold whichever strength it stops at."""
    return spec.alpha / len(spec.strengths)


def judge(suites: list[Suite], base: dict[str, Measured], cand: dict[str, Measured], spec: GuardSpec, strength: float,
          root: dict[str, Measured] | None = None, level: float | None = None) -> StrengthResult:
    """Every suite against the baseline at one strength, each test at `level` (default
    `level_of(spec)`). The target must show its gain (rules.judge_target); every guard suite
    and the mean over the recipe's suites must show that the drop is within its bar (the upper
    bound, rules.judge_drop). With `root` (the base model's predictions on the recipe's guard
    suites: guard.cumulative), each of those suites' bars also holds against the base model,
    so drops that each night allows cannot add up over many nights."""
    level = level_of(spec) if level is None else level
    results, prior = [], []
    for s in suites:
        b, a = base[s.name], cand[s.name]
        if s.role == "target":
            results.append(rules.judge_target(s.name, b, a, spec, level))
            continue
        if at_chance(s, b, spec.alpha):  # its changes are noise: reported, never judged, not in the mean
            results.append(rules.unjudged(s.name, b, a, "baseline at chance: not judged"))
            continue
        result, change = rules.judge_drop(s.name, b, a, s.max_drop_pp, spec, level, caption=s.caption)
        r = root.get(s.name) if root else None
        if result.passed and r is not None and not at_chance(s, r, spec.alpha):
            since, _ = rules.judge_drop(s.name, r, a, s.max_drop_pp, spec, level, caption=s.caption)
            if not since.passed:
                result = dataclasses.replace(result, passed=False, why=f"since the base model: {since.why}")
        results.append(result)
        if not s.holdout:
            prior.append(change)
    reasons = [f"{r.name}: {r.why}" for r in results if not r.passed]
    mean = rules.judge_mean(prior, spec, level)
    if not mean.passed:
        reasons.append(mean.why)
    if not prior and not spec.allow_unguarded:
        reasons.append(UNGUARDED)
    return StrengthResult(strength, results, mean.change_pp, not reasons, "; ".join(reasons) or "all checks pass",
                          level, mean.bound_pp, mean.why)


def keep_predictions(cache: PredictionCache, fingerprint: str, loaded: LoadedModel, suites: list[Suite],
                     preds: dict[str, Measured], batch_size: int, device: str) -> None:
    """Keep a promoted version's predictions as the guard made them (the caller checked that the
    weights it judged have the version's `fingerprint`): the next night's guard, whose baseline
    it is, and the measurements between stream rounds find them made. The writer alone calls
    this (under torchrun the other ranks have returned), so no collective is involved."""
    # retrieval rows are recomputed: one cheap pass; caption likelihoods too: they depend on the
    # text tower and decoder, which the key (vision fingerprint, preprocessing, head) does not cover
    for s in (s for s in suites if s.row is None and not s.caption):
        cache.put(key(fingerprint, loaded.preprocess, s.head, s.images, batch_size, device), preds[s.name])


def predict_all(loaded: LoadedModel, suites: list[Suite], batch_size: int, device: str,
                cache: PredictionCache | None = None) -> dict[str, Measured]:
    """One plain pass per suite (nothing kept), or the cache's copy of it (never a caption
    likelihood's: see keep_predictions)."""
    return evaluate_suites(
        suites, lambda s: cached(loaded, s, batch_size, device, cache, lambda: predict(loaded, s.head, s.images, batch_size, device)),
        lambda s: SuiteInputs(s.images, loaded.preprocess, batch_size).embed(loaded.model, device),
        lambda s: captioning.scores(loaded, SuiteInputs(s.images, loaded.preprocess, batch_size), device))


def cached(loaded: LoadedModel, suite: Suite, batch_size: int, device: str, cache: PredictionCache | None,
           run: Callable[[], Predictions]) -> Predictions:
    """`run()`, or the predictions `cache` kept for this model, suite, head, batch size and device."""
    if cache is None:
        return run()
    k = key(loaded.fingerprint, loaded.preprocess, suite.head, suite.images, batch_size, device)
    hits = cache.hits
    result = cache.get_or_compute(k, suite.images.labels, run)
    if cache.hits > hits:
        progress.advance(len(suite.images))  # a pass the cache saved counts as done
    return result


def search_strengths(
    baseline: LoadedModel, delta: Delta, suites: list[Suite], spec: GuardSpec, batch_size: int, device: str,
    base_predictions: dict[str, Measured] | None = None, cache: PredictionCache | None = None,
    keep_bytes: int = DEFAULT_BUDGET_BYTES, root: dict[str, Measured] | None = None,
    level: float | None = None, every: bool = False,
) -> tuple[list[StrengthResult], dict[float, dict[str, Measured]], dict[str, Measured]]:
    """Evaluate baseline once and baseline + lambda * delta from the largest lambda down, in this
    process, same device and batches, each judged at `level` (default level_of(spec)); stop at
    the first strength that passes (`every`: evaluate them all, as the bench does). Each suite is
    read once: its inputs at the first module the delta touches are kept (within `keep_bytes`)
    and every pass runs only the rest of the tower; the baseline's predictions come from `cache`
    when it has them; `root`: see judge. Returns the trials, the candidates' predictions, the
    baseline's."""
    entry = "" if not keep_bytes else (describe_tower(baseline.model).entry_for(delta.params)
                                       if any(p.startswith("visual.") for p in delta.params) else FEATURES)
    budget = Budget(keep_bytes)
    # a caption likelihood reads the tower's image tokens, which kept features do not hold: a
    # prompt patch's captioning suites keep their decoded images instead
    inputs = {s.source: SuiteInputs(s.images, baseline.preprocess, batch_size, "" if s.caption and entry == FEATURES else entry,
                                    budget) for s in suites}

    def run(s: Suite) -> Predictions:
        return inputs[s.source].predict(baseline.model, s.head, device)

    def embed(s: Suite) -> torch.Tensor:
        return inputs[s.source].embed(baseline.model, device)

    def score(s: Suite) -> Scores:
        return captioning.scores(baseline, inputs[s.source], device)

    base = base_predictions or evaluate_suites(suites, lambda s: cached(baseline, s, batch_size, device, cache, lambda: run(s)),
                                               embed, score)
    trials, preds = [], {}
    for strength in sorted(spec.strengths, reverse=True):
        originals = apply_delta(baseline.model, delta, strength)
        try:  # a prompt patch changes what the text side makes of every suite's classes
            preds[strength] = evaluate_suites(with_heads(baseline, suites) if delta.touches_text else suites, run, embed, score)
        finally:
            restore(baseline.model, originals)
        trials.append(judge(suites, base, preds[strength], spec, strength, root, level))
        if not every and (trials[-1].passed or UNGUARDED in trials[-1].why):  # no smaller strength can be guarded either
            progress.advance((len(spec.strengths) - len(trials)) * images_per_pass(suites))  # the passes not needed
            break
    return trials, preds, base


CHOICE_RULE = "the largest strength that passes, tried from λ {top:g} down, each at α {alpha:g}/{m} = {level:.3g}"


def choose(trials: list[StrengthResult]) -> StrengthResult | None:
    """The largest passing strength: the search tests from the largest down and each test is
    at level_of(spec), so this is the choice whose error rates the verdict states."""
    passing = [t for t in trials if t.passed]
    return max(passing, key=lambda t: t.strength) if passing else None


def class_outcomes(images: ImageSet, before: Predictions, after: Predictions) -> list[ClassOutcome]:
    """Per class: how many images the patch fixed, left wrong, broke, kept right."""
    b, a, labels = before.correct, after.correct, before.labels
    out = []
    for k, name in enumerate(images.classnames):
        m = labels == k
        if m.any():
            out.append(ClassOutcome(name, int(m.sum()), int((~b & a & m).sum()), int((~b & ~a & m).sum()),
                                    int((b & ~a & m).sum()), int((b & a & m).sum())))
    return out


def predictions_hash(p: Measured) -> str:
    import hashlib

    out = outputs(p)
    return hashlib.sha256(out.astype(np.float64 if isinstance(p, Scores) else np.int64).tobytes()).hexdigest()


def evidence_of(ws, suites: list[Suite], before: dict[str, Measured], after: dict[str, Measured],
                strength: float) -> Evidence:
    """Every suite's images, labels and both models' predictions (a captioning suite: both
    models' caption likelihoods), as the verdict keeps them."""
    return Evidence(strength, [
        SuiteEvidence(s.name, s.role, list(s.images.classnames), [ws.portable(x) for x in sources_of(s)],
                      before[s.name].labels, outputs(before[s.name]), outputs(after[s.name]),
                      "scores" if s.caption else "labels")
        for s in suites
    ])


def sources_of(suite: Suite) -> list[str]:
    """What each of a suite's predictions is about: its images, or a retrieval row's queries."""
    return query_sources(suite.images, suite.row.direction) if suite.row else [x.source for x in suite.images.samples]


def guard_suites(ctx: Context, loaded: LoadedModel, manifest: PatchManifest, baseline: str) -> tuple[list[Suite], list[str]]:
    """The candidate's target holdout, the recipe's guard suites and, after the first accepted
    fix, every earlier version's holdout (a later patch may not undo an earlier fix)."""
    recipe, notes = ctx.recipe, []
    target = open_holdout(manifest.holdout, ctx.workspace.root)
    suites = [Suite("target-holdout", "target", target, text_head(loaded, target.classnames, manifest.holdout.templates), 0.0,
                    templates=tuple(manifest.holdout.templates))]
    for spec in recipe.guard.suites:
        if spec.optional and not ctx.resolve(spec.path).is_dir():
            notes.append(f"{spec.label}: not there, skipped (optional)")
            continue
        images = open_guard_suite(ctx, spec)
        if spec.kind == "captioning":  # one row: the mean caption likelihood (captioning.py)
            captioning.require_suite_model(loaded, spec.label)
            suites.append(Suite(captioning.row_name(images.name), "guard", images, torch.zeros(0), spec.max_drop_pp,
                                group=images.name, caption=True))
            continue
        if spec.kind == "retrieval":
            captions = text_head(loaded, images.classnames, CAPTION_TEMPLATE)
            suites += [Suite(row.name(images.name), "guard", images, captions, spec.max_drop_pp, row=row, group=images.name,
                             templates=tuple(CAPTION_TEMPLATE)) for row in rows_for(images)]
            continue
        suites.append(Suite(images.name, "guard", images, text_head(loaded, images.classnames, spec.templates), spec.max_drop_pp,
                            templates=tuple(spec.templates)))
    suites += history_suites(ctx, loaded, baseline)
    return suites, notes


HISTORY = "history"


def history_suites(ctx: Context, loaded: LoadedModel, baseline: str) -> list[Suite]:
    """The holdouts of every version in `baseline`'s chain, pooled into one growing suite (one
    per set of templates, should the recipe's have changed), judged by its bound against
    guard.holdout_max_drop_pp: one tiny holdout per night would veto by a single image."""
    groups: dict[tuple, list[ImageSet]] = {}
    for v in store.chain(ctx.workspace, baseline):
        ref = store.read_manifest(ctx.workspace, v).holdout
        images = open_holdout(ref, ctx.workspace.root)  # rows of one saved dataset pool only with that dataset's
        groups.setdefault((tuple(ref.templates), images.root if images.dataset is not None else ""), []).append(images)
    suites = []
    for i, ((templates, _), sets) in enumerate(groups.items()):
        images = merge_sets(HISTORY if i == 0 else f"{HISTORY}-{i + 1}", sets)
        suites.append(Suite(images.name, "guard", images, text_head(loaded, images.classnames, list(templates)),
                            ctx.recipe.guard.holdout_max_drop_pp, holdout=True, templates=templates))
    return suites


def run_guard(ctx: Context, candidate_id: Optional[str], baseline: Optional[str], make_current: bool = True) -> GuardReport:
    """Judge a candidate (default: the newest one `vepatch apply` made that nobody judged yet);
    accepted -> the next vN. A candidate is judged once: its verdict is never overwritten. The
    workspace lock is held throughout (under torchrun, by rank 0)."""
    with ctx.workspace.lock() if distributed.is_writer() else contextlib.nullcontext():
        return _judge(ctx, candidate_id, baseline, make_current)


def _judge(ctx: Context, candidate_id: Optional[str], baseline: Optional[str], make_current: bool) -> GuardReport:
    ws = ctx.workspace
    candidate_id = candidate_id or store.waiting_candidate(ws)
    store.check_unjudged(ws, candidate_id)
    manifest, delta = store.read_candidate(ws, candidate_id)
    baseline = baseline or store.head(ws)
    parent, _ = ctx.model(manifest.parent)
    if parent.fingerprint != manifest.parent_fingerprint:
        raise store.StoreError(f"candidate {manifest.candidate_id}: its parent's fingerprint does not match", "it is refused")
    suites, notes = guard_suites(ctx, parent, manifest, baseline)
    notes += [f"trained on the same shots as {v}: its gain may be the same fix again" for v in store.chain(ws, baseline)
              if store.read_manifest(ws, v).shots_hash == manifest.shots_hash]
    spec, bs = ctx.recipe.guard, ctx.recipe.batch_size
    # guard.cumulative: the recipe's suites are also held against the base model (see judge)
    lasting = [s for s in suites if s.role == "guard" and not s.holdout] if spec.cumulative and baseline != "base" else []
    passes = 1 + len(spec.strengths) + (baseline != manifest.parent)  # at most: the search stops at the first pass
    progress.begin("guard", passes * images_per_pass(suites) + images_per_pass(lasting))
    base_predictions, root, cache = None, None, ctx.prediction_cache()
    if baseline != manifest.parent:
        base_model, _ = ctx.model(baseline)
        base_predictions = predict_all(base_model, with_heads(base_model, suites), bs, ctx.device, cache)
    if lasting:
        root_model, _ = ctx.model("base")
        root = predict_all(root_model, with_heads(root_model, lasting), bs, ctx.device, cache)
    trials, preds, base = search_strengths(parent, delta, suites, spec, bs, ctx.device, base_predictions, cache, root=root)
    notes += [f"{s.name}: the baseline is at chance there ({100 * base[s.name].accuracy:.1f}%, "
              f"{len(s.images.classnames)} classes), so it guards nothing and is not judged" for s in suites
              if at_chance(s, base[s.name], spec.alpha)]
    best = choose(trials)
    shown = best or max(trials, key=lambda t: t.target_gain_pp)  # a refusal still says what the best try did
    tried = {t.strength for t in trials}
    report = GuardReport(
        candidate_id=manifest.candidate_id, baseline=baseline,
        baseline_fingerprint=ctx.model(baseline)[0].fingerprint, accepted=best is not None,
        strength=best.strength if best else 0.0, trials=trials,
        reason=(f"accepted at strength {best.strength}" if best else
                "refused: no strength passes: " + "; ".join(f"λ {t.strength:g}: {t.first_failure}" for t in trials))
        + ("" if not notes else " [" + "; ".join(notes) + "]"),
        predictions_sha256={k: predictions_hash(v) for k, v in (preds[best.strength] if best else base).items()},
        created=clock.stamp(),
        target_outcomes=class_outcomes(suites[0].images, base[suites[0].name], preds[shown.strength][suites[0].name]),
        rule=CHOICE_RULE.format(top=max(spec.strengths), alpha=spec.alpha, m=len(spec.strengths), level=level_of(spec)),
        untried=sorted((x for x in spec.strengths if x not in tried), reverse=True) if best else [],
    )
    if not distributed.is_writer():  # under torchrun, rank 0 alone writes
        return report
    proof = evidence.to_bytes(evidence_of(ws, suites, base, preds[shown.strength], shown.strength))
    version = ""
    if best:  # the version first: a crash before the verdict below leaves a findable version (store.version_of)
        scaled = delta.scaled(best.strength)
        fp = patched_fingerprint(parent.model, scaled)
        version = store.write_version(ws, dataclasses.replace(manifest, strength=best.strength, fingerprint=fp),
                                      scaled, report, proof, make_current=make_current)
        report = dataclasses.replace(report, version=version)
        if cache is not None and not delta.touches_text and patched_fingerprint(parent.model, delta, best.strength) == fp:
            keep_predictions(cache, fp, parent, suites, preds[best.strength], bs, ctx.device)
    store.write_verdict(ws, manifest.candidate_id, report, proof)
    ws.log("guard", candidate=manifest.candidate_id, baseline=baseline, accepted=report.accepted,
           strength=report.strength, version=version, reason=report.reason)
    if version:
        ws.log("promote", version=version, current=make_current)
    return report
