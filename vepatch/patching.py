"""apply and guard, end to end: shots and holdout, masks, training, candidate records,
paired guard evaluation, promotion to a version."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from . import __version__, distributed, store
from .data import ImageSet, Sample, open_image_set, split_shots
from .delta import apply_delta, restore
from .diagnose import Masks, build_masks, mean_gradients
from .errors import DataError, UsageError
from .guard import Suite, choose, predictions_hash, search_strengths
from .heads import text_head
from .methods import MASKED_METHODS
from .methods.build import build_trainable
from .methods.train import train
from .models import fingerprint
from .records import GuardReport, HoldoutRef, PatchManifest, read_record
from .recipe import Recipe
from .session import Context, open_guard_suite
from .towers import describe_tower


def _utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def open_pool(ctx: Context, recipe: Recipe) -> ImageSet:
    if recipe.shot_pool is None:
        raise UsageError(f"{ctx.workspace.recipe_path}: no shot_pool", "set shot_pool.path to a labelled folder of the target classes")
    spec = recipe.shot_pool
    return open_image_set(ctx.resolve(spec.path), recipe.classes, spec.folders, spec.name or "target",
                          spec.max_per_class, recipe.seed)


def latest_diagnosis_masks(ctx: Context, fingerprint_: str, choice: str) -> tuple[Optional[Masks], str]:
    """Masks of the chosen diagnosis ('latest', a file name, or 'none'), if made on this model."""
    from safetensors.torch import load_file

    from .records import Diagnosis

    if choice == "none":
        return None, ""
    folder = ctx.workspace.diagnoses
    files = sorted(folder.glob("*.json")) if choice == "latest" else [folder / (choice if choice.endswith(".json") else choice + ".json")]
    for path in reversed(files):
        if not path.is_file():
            raise UsageError(f"{path}: no such diagnosis", "use --diagnosis latest or a file in .vepatch/diagnoses/")
        d = read_record(Diagnosis, path)
        if d.fingerprint == fingerprint_:
            return Masks.from_tensors(load_file(str(folder / d.masks_file))), path.name
        if choice != "latest":
            raise UsageError(f"{path}: made on another model version", "diagnose again on the current version")
    return None, ""


def compute_masks(ctx, loaded, head, shots, method, recipe, tower) -> Masks:
    spec = recipe.diagnose
    names = tower.fc1 + (tower.qkv if method != "spu" else [])
    objective = "logit-norm" if method == "spu" else "ce"
    grads = mean_gradients(loaded, head, shots, names, spec.batch_size, spec.max_samples, ctx.device, recipe.seed, objective)
    if method == "spu":
        tower = dataclasses.replace(tower, qkv=[])
    control = "random" if method == "lorsu-random" else "none"
    return build_masks(grads, tower, spec.fc1_fraction, spec.heads_per_layer, control, recipe.seed)


def run_apply(ctx: Context, recipe: Recipe, diagnosis: str = "latest", progress: Optional[Callable[[int, int], None]] = None) -> PatchManifest:
    spec = recipe.apply
    pool = open_pool(ctx, recipe)
    train_idx, holdout_idx = split_shots(pool, spec.shots, recipe.seed, spec.holdout_per_class)
    if not holdout_idx:
        raise DataError(f"{pool.root}: no image left for the target holdout", "lower --shots or add images to the pool")
    shots, holdout = pool.subset(train_idx, "shots"), pool.subset(holdout_idx, "target-holdout")
    loaded, version = ctx.model()
    tower = describe_tower(loaded.model)
    head = text_head(loaded, recipe.classes, recipe.templates)

    masks, diagnosis_file = None, ""
    if spec.method in MASKED_METHODS:
        if spec.method in ("lorsu", "lorsu-fc1", "lorsu-heads"):
            masks, diagnosis_file = latest_diagnosis_masks(ctx, loaded.fingerprint, diagnosis)
        if masks is None:
            masks = compute_masks(ctx, loaded, head, shots, spec.method, recipe, tower)

    visual = copy.deepcopy(loaded.model.visual)
    torch.manual_seed(recipe.seed)  # LoRA factors are initialized from the global generator
    trainable = build_trainable(spec.method, visual, tower, masks, spec)
    prompts = None
    if spec.loss == "contrastive":  # (classes, templates, dim): one random template per image
        prompts = torch.stack([text_head(loaded, recipe.classes, [t]) for t in recipe.templates], dim=1)
    scale = loaded.model.logit_scale.exp().detach()
    reference = reference_logits(ctx, loaded, recipe) if spec.distill > 0 else None
    from .oom import retry_on_oom

    def attempt(batch_size: int, trainable=trainable):  # bound now: the name is deleted below
        trainable.reset()  # a retry starts from the parent again
        return train(trainable, train_preprocess(loaded, spec.augment_scale), shots, head, scale,
                     dataclasses.replace(spec, batch_size=batch_size), recipe.seed, ctx.device, prompts, reference, progress)

    stats = retry_on_oom(attempt, spec.batch_size, f"apply --method {spec.method}")
    delta = trainable.delta()
    allowed = dict(sorted(trainable.summary.items()))
    del visual, trainable

    originals = apply_delta(loaded.model, delta)
    candidate_fp = fingerprint(loaded.model.visual)
    restore(loaded.model, originals)
    data = delta.to_bytes()
    from ._typed import to_plain
    from .delta import sha256_bytes

    manifest = PatchManifest(
        candidate_id=f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{spec.method}-s{recipe.seed}",
        method=spec.method,
        base_ref=recipe.model.ref,
        base_fingerprint=ctx.base_fingerprint(),
        parent=version,
        parent_fingerprint=loaded.fingerprint,
        fingerprint=candidate_fp,
        strength=1.0,
        patch_sha256=sha256_bytes(data),
        patch_bytes=len(data),
        trainable_params=delta.trainable_count(),
        masks=allowed,
        seed=recipe.seed,
        shots_hash=shots.content_hash(),
        holdout=HoldoutRef(pool.name, list(pool.classnames), list(recipe.templates),
                           [s.source for s in holdout.samples], holdout.labels),
        diagnosis=diagnosis_file,
        recipe=to_plain(recipe),
        libraries=_libraries(),
        metrics={"apply_seconds": stats.seconds, "peak_memory_mb": stats.peak_memory_mb,
                 "final_loss": stats.final_loss, "steps": float(stats.steps), "shots": float(len(shots))},
        created=_utc(),
    )
    with ctx.workspace.lock():
        store.write_candidate(ctx.workspace, manifest, data)
        ctx.workspace.log("apply", candidate=manifest.candidate_id, method=spec.method, parent=version,
                          trainable_params=manifest.trainable_params, patch_bytes=manifest.patch_bytes,
                          seconds=round(stats.seconds, 2))
    return manifest


def train_preprocess(loaded, min_scale: float):
    """open_clip's training transform (random resized crops) with the model's own normalization."""
    if min_scale >= 1.0:
        return loaded.preprocess
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(loaded.model)
    return open_clip.image_transform(cfg["size"], is_train=True, mean=cfg["mean"], std=cfg["std"],
                                     interpolation=cfg.get("interpolation"), aug_cfg={"scale": (min_scale, 1.0)})


REFERENCE_IMAGES = 256  # reference images kept in memory for distillation


def reference_logits(ctx: Context, loaded, recipe: Recipe):
    """(images, parent logits, head) on the recipe's reference set, for KL distillation."""
    from .evaluate import loader

    if recipe.reference is None:
        raise UsageError("apply.distill > 0 needs reference images", "set `reference: {path: ...}` in vepatch.yaml")
    spec = recipe.reference
    images = open_image_set(ctx.resolve(spec.path), None, spec.folders, spec.name or "reference", spec.max_per_class, recipe.seed)
    images = images.subset(list(range(min(len(images), REFERENCE_IMAGES))))
    ref_head = text_head(loaded, images.classnames, recipe.templates)
    batches, logits = [], []
    scale = loaded.model.logit_scale.exp().detach()
    with torch.no_grad():
        for x, _ in loader(images, loaded.preprocess, recipe.batch_size):
            batches.append(x)
            logits.append(scale * loaded.model.encode_image(x.to(ctx.device), normalize=True).float().cpu() @ ref_head.T)
    return torch.cat(batches), torch.cat(logits), ref_head


def _libraries() -> dict[str, str]:
    import open_clip
    import timm

    return {"vepatch": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


# --- guard --------------------------------------------------------------------------------


def holdout_set(ref: HoldoutRef) -> ImageSet:
    if ref.sources and "#" in ref.sources[0]:
        root = ref.sources[0].rsplit("#", 1)[0]
        full = open_image_set(Path(root), ref.classnames, name=ref.name)
        by_source = {s.source: i for i, s in enumerate(full.samples)}
        return full.subset([by_source[s] for s in ref.sources], ref.name)
    root = str(Path(ref.sources[0]).parent.parent) if ref.sources else ""
    return ImageSet(ref.name, root, list(ref.classnames), [Sample(s, y) for s, y in zip(ref.sources, ref.labels)])


def guard_suites(ctx: Context, loaded, manifest: PatchManifest, baseline: str) -> tuple[list[Suite], list[str]]:
    recipe, notes = ctx.recipe, []
    target = holdout_set(manifest.holdout)
    suites = [Suite("target-holdout", "target", target, text_head(loaded, target.classnames, manifest.holdout.templates), 0.0)]
    for spec in recipe.guard.suites:
        if spec.optional and not ctx.resolve(spec.path).is_dir():
            notes.append(f"{spec.name or spec.path}: not there, skipped (optional)")
            continue
        images = open_guard_suite(ctx, spec)
        suites.append(Suite(images.name, "guard", images, text_head(loaded, images.classnames, spec.templates), spec.max_drop_pp))
    if baseline != "base":  # earlier accepted fixes must survive: their holdouts guard too
        for v in store.chain(ctx.workspace, baseline):
            ref = store.read_manifest(ctx.workspace, v).holdout
            images = holdout_set(dataclasses.replace(ref, name=f"{v}-holdout"))
            suites.append(Suite(images.name, "guard", images, text_head(loaded, images.classnames, ref.templates), 1.0))
    return suites, notes


def run_guard(ctx: Context, candidate_id: Optional[str], baseline: Optional[str], promote: bool = True, make_current: bool = True):
    ws = ctx.workspace
    manifest, delta = store.read_candidate(ws, candidate_id)
    baseline = baseline or store.head(ws)
    parent, _ = ctx.model(manifest.parent)
    if parent.fingerprint != manifest.parent_fingerprint:
        raise store.StoreError(f"candidate {manifest.candidate_id}: its parent's fingerprint does not match", "it is refused")
    suites, notes = guard_suites(ctx, parent, manifest, baseline)
    spec, bs = ctx.recipe.guard, ctx.recipe.batch_size
    base_predictions, cache = None, ctx.prediction_cache()
    if baseline != manifest.parent:
        from .guard import predict_all

        base_model, _ = ctx.model(baseline)
        base_predictions = predict_all(base_model, suites, bs, ctx.device, cache)
    with ws.lock() if distributed.is_writer() else contextlib.nullcontext():
        trials, preds, base = search_strengths(parent, delta, suites, spec, bs, ctx.device, base_predictions, cache)
        best = choose(trials)
        report = GuardReport(
            candidate_id=manifest.candidate_id, baseline=baseline,
            baseline_fingerprint=ctx.model(baseline)[0].fingerprint, accepted=best is not None,
            strength=best.strength if best else 0.0, trials=trials,
            reason=(f"accepted at strength {best.strength}" if best else "refused: no strength passes: " + trials[-1].why)
            + ("" if not notes else " [" + "; ".join(notes) + "]"),
            predictions_sha256={k: predictions_hash(v) for k, v in (preds[best.strength] if best else base).items()},
            created=_utc(),
        )
        if not distributed.is_writer():  # under torchrun, rank 0 alone writes
            return report
        from .fsio import write_text_atomic
        from .records import to_json

        write_text_atomic(store.candidate_dir(ws, manifest.candidate_id) / store.GUARD_FILE, to_json(report))
        version = ""
        if best and promote:
            scaled = delta.scaled(best.strength)
            originals = apply_delta(parent.model, scaled)
            fp = fingerprint(parent.model.visual)
            restore(parent.model, originals)
            version = store.write_version(ws, dataclasses.replace(manifest, strength=best.strength, fingerprint=fp),
                                          scaled, report, make_current=make_current)
            report = dataclasses.replace(report, version=version)
        ws.log("guard", candidate=manifest.candidate_id, baseline=baseline, accepted=report.accepted,
               strength=report.strength, version=version, reason=report.reason)
        if version:
            ws.log("promote", version=version, current=make_current)
    return report
