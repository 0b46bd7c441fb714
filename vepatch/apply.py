"""`vepatch apply`: shots and a disjoint target holdout from the pool, masks (a matching
diagnosis, or scored on the shots), one method's training on a copy of the current version's
tower, and the candidate written to the store (not yet a version: the guard decides)."""

from __future__ import annotations

import copy
import dataclasses
import platform
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import __version__, clock, store
from .captioning import caption_target, require_coca
from .context import Context
from .data import merge_sets, ImageSet, open_image_set, split_shots
from .delta import patched_fingerprint
from .diagnose import mean_gradients
from .errors import DataError, UsageError
from .masks import Masks, build_masks
from .methods import Method, get as get_method
from .methods.train import Objective, train
from .models import LoadedModel
from .models.heads import text_head
from .models.towers import Tower, describe_tower
from .progress import steps
from .recipe import DiagnoseSpec, Recipe
from .workspace import Workspace
from .records import Diagnosis, HoldoutRef, PatchManifest, read_record


@dataclass(frozen=True)
class ShotPlan:
    """What one apply trains on and is judged by."""

    shots: ImageSet  # the training images
    holdout: HoldoutRef  # the target holdout the guard measures (never among the shots)
    cycle: str = ""  # the cycle that made the plan ('' for `vepatch apply`)
    reference: Optional[ImageSet] = None  # images to distill the parent on, when the recipe names none


def plan_from_pool(ctx: Context, recipe: Recipe, folder: Optional[Path] = None) -> ShotPlan:
    """`vepatch apply`: seeded shots per class from the shot pool (or from `folder`, e.g.
    errors/), and a disjoint target holdout from the same images."""
    if folder is not None:
        pool = open_image_set(ctx.resolve(folder), recipe.classes, {}, folder.name, 0, recipe.seed)
    elif recipe.shot_pool is None:
        raise UsageError(f"{ctx.workspace.recipe_path}: no shot_pool",
                         "set shot_pool.path to a labelled folder of the target classes, or pass --from DIR")
    else:
        spec = recipe.shot_pool
        pool = open_image_set(ctx.resolve(spec.path), recipe.classes, spec.folders, spec.name or "target",
                              spec.max_per_class, recipe.seed)
    train_idx, holdout_idx = split_shots(pool, recipe.apply.shots, recipe.seed, recipe.apply.holdout_per_class)
    if not holdout_idx:
        raise DataError(f"{pool.root}: no image left for the target holdout", "lower --shots or add images to the pool")
    holdout = pool.subset(holdout_idx, "target-holdout")
    return ShotPlan(pool.subset(train_idx, "shots"), holdout_ref(holdout, pool.name, recipe, ctx.workspace))


def holdout_ref(holdout: ImageSet, name: str, recipe: Recipe, ws: Workspace) -> HoldoutRef:
    return HoldoutRef(name, list(holdout.classnames), list(recipe.templates),
                      [ws.portable(s.source) for s in holdout.samples], holdout.labels)


def mismatch(d: Diagnosis, fingerprint_: str, spec: DiagnoseSpec, tower: Tower) -> str:
    """Why diagnosis `d` cannot give the masks this apply would compute ('' if it can): same
    model version, the recipe's budget (fc1_fraction, heads_per_layer), and real blame, not
    the random control. A head budget counts as the heads `tower` has: a CNN has none (its
    diagnosis records 0), and asking for more heads than a block has selects them all."""
    if d.fingerprint != fingerprint_:
        return "made on another model version"
    if d.control != "none":
        return f"its masks are the '{d.control}' control"
    if (d.fc1_fraction, heads_budget(d.heads_per_layer, tower)) != (spec.fc1_fraction, heads_budget(spec.heads_per_layer, tower)):
        return (f"made with fc1_fraction {d.fc1_fraction:g} / heads_per_layer {d.heads_per_layer}, the recipe says "
                f"{spec.fc1_fraction:g} / {spec.heads_per_layer}")
    return ""


def heads_budget(heads_per_layer: int, tower: Tower) -> int:
    """The heads per block a budget selects on `tower` (build_masks: at most the block's heads)."""
    return min(heads_per_layer, tower.num_heads) if tower.qkv else 0


@dataclass(frozen=True)
class DiagnosisChoice:
    """The masks apply takes from a diagnosis, and why the newest diagnosis was passed over."""

    masks: Optional[Masks] = None
    file: str = ""  # the diagnosis used ('' if none)
    note: str = ""  # one line when the newest diagnosis was passed over ('' otherwise)


def diagnosis_masks(ctx: Context, fingerprint_: str, choice: str, spec: DiagnoseSpec, tower: Tower) -> DiagnosisChoice:
    """Masks of the chosen diagnosis ('latest': the newest that matches, see `mismatch`; a file
    name: that one, or an error saying why it does not fit; 'none')."""
    from safetensors.torch import load_file

    if choice == "none":
        return DiagnosisChoice()
    folder = ctx.workspace.diagnoses
    files = sorted(folder.glob("*.json")) if choice == "latest" else [folder / (choice if choice.endswith(".json") else choice + ".json")]
    passed = ""
    for path in reversed(files):
        if not path.is_file():
            raise UsageError(f"{path}: no such diagnosis", "use --diagnosis latest or a file in .vepatch/diagnoses/")
        d = read_record(Diagnosis, path)
        why = mismatch(d, fingerprint_, spec, tower)
        if not why:
            masks = Masks.from_tensors(load_file(str(folder / d.masks_file)))
            return DiagnosisChoice(masks, path.name, f"{passed}; used {path.name} instead" if passed else "")
        if choice != "latest":
            raise UsageError(f"{path}: {why}", "diagnose again with the recipe's settings, or use --diagnosis latest")
        passed = passed or f"diagnosis {path.name} passed over: {why}"
    return DiagnosisChoice(note=f"{passed}; masks scored on the shots" if passed else "")


def score_masks(ctx: Context, loaded: LoadedModel, head: torch.Tensor, shots: ImageSet, method: Method,
                recipe: Recipe, tower: Tower) -> Masks:
    """The masks a method needs, scored on the shots (LoRSU's gradients, SPU's label-free
    score, or LoRSU's budget at random places)."""
    spec = recipe.diagnose
    if method.masks == "logit-norm":  # SPU: fc1 only
        tower = dataclasses.replace(tower, qkv=[])
    objective = "logit-norm" if method.masks == "logit-norm" else "ce"
    grads = mean_gradients(loaded, head, shots, tower.fc1 + tower.qkv, spec.batch_size, spec.max_samples, ctx.device,
                           recipe.seed, objective)
    control = "random" if method.masks == "random" else "none"
    return build_masks(grads, tower, spec.fc1_fraction, spec.heads_per_layer, control, recipe.seed)


def run_apply(ctx: Context, recipe: Recipe, plan: Optional[ShotPlan] = None, diagnosis: str = "latest",
              progress: Optional[Callable[[int, int], None]] = None, origin: str = "apply") -> PatchManifest:
    """Train a candidate on the current version from `plan` (default: the shot pool's), holding
    the workspace lock throughout. `origin` ('apply' or 'bench') says who asked; a cycle's plan
    makes it 'cycle'."""
    if origin not in ("apply", "bench"):
        raise UsageError(f"--origin {origin}: not 'apply' or 'bench'", "leave --origin out")
    with ctx.workspace.lock():
        return _apply(ctx, recipe, plan, diagnosis, progress, origin)


def _apply(ctx: Context, recipe: Recipe, plan: Optional[ShotPlan], diagnosis: str,
           progress: Optional[Callable[[int, int], None]], origin: str) -> PatchManifest:
    spec = recipe.apply
    method = get_method(spec.method)
    progress = progress or steps("training")
    plan = plan or plan_from_pool(ctx, recipe)
    shots = plan.shots
    loaded, version = ctx.model()
    if spec.loss == "cafe":  # before anything trains: CAFe captions with the model's own decoder
        check_cafe(loaded, method)
    tower = describe_tower(loaded.model)
    head = text_head(loaded, recipe.classes, recipe.templates)

    if method.side == "text":
        from .methods.prompting import train_prompts

        delta, allowed, stats = train_prompts(method, loaded, train_preprocess(loaded, spec.augment_scale), shots,
                                              recipe.classes, recipe.templates, spec, recipe.seed, ctx.device, progress)
        return _write(ctx, recipe, plan, loaded, version, delta, dict(sorted(allowed.items())), stats, DiagnosisChoice(), origin)

    chosen = DiagnosisChoice()
    if method.masks == "diagnosis":
        chosen = diagnosis_masks(ctx, loaded.fingerprint, diagnosis, recipe.diagnose, tower)
    masks = chosen.masks
    if method.needs_masks and masks is None:
        masks = score_masks(ctx, loaded, head, shots, method, recipe, tower)

    visual = copy.deepcopy(loaded.model.visual)
    torch.manual_seed(recipe.seed)  # LoRA factors are initialized from the global generator
    trainable = method.make(visual, tower, masks, spec)
    prompts = None
    if spec.loss == "contrastive":  # (classes, templates, dim): one random template per image
        prompts = torch.stack([text_head(loaded, recipe.classes, [t]) for t in recipe.templates], dim=1)
    # distillation: on the recipe's reference set, or a cycle's earlier images (none on a first night: nothing to keep yet)
    distill = spec.distills and not (plan.cycle and plan.reference is None and recipe.reference is None)
    reference = reference_logits(ctx, loaded, recipe, plan.reference) if distill else None
    captions = caption_target(loaded, recipe.classes, recipe.templates) if spec.loss == "cafe" else None
    objective = Objective(head, loaded.model.logit_scale.exp().detach(), prompts, reference, captions)
    from .runtime.oom import retry_on_oom

    def attempt(batch_size: int, trainable=trainable):  # bound now: the name is deleted below
        trainable.reset()  # a retry starts from the parent again
        return train(trainable, train_preprocess(loaded, spec.augment_scale), shots, objective,
                     dataclasses.replace(spec, batch_size=batch_size), recipe.seed, ctx.device, progress)

    stats = retry_on_oom(attempt, spec.batch_size, f"apply --method {spec.method}")
    delta = trainable.delta().stored_as(spec.patch_dtype)  # rounded before it is judged: the guard sees what is stored
    allowed = dict(sorted(trainable.summary.items()))
    del visual, trainable
    return _write(ctx, recipe, plan, loaded, version, delta, allowed, stats, chosen, origin)


def check_cafe(loaded: LoadedModel, method: Method) -> None:
    """`apply.loss: cafe` trains the vision tower of a CoCa against its own decoder; a usage
    error otherwise (no decoder to caption with, or a method that leaves the tower alone)."""
    require_coca(loaded, "apply.loss: cafe", "use apply.loss: ce (or --loss ce), or an open_clip CoCa as model.ref")
    if method.side != "vision":
        raise UsageError(f"apply.loss: cafe trains the vision tower; --method {method.name} learns prompts",
                         "use a vision method (lorsu, lora, ln, full, ...) or apply.loss: ce")


def _write(ctx: Context, recipe: Recipe, plan: ShotPlan, loaded: LoadedModel, version: str, delta, allowed: dict[str, int],
           stats, chosen: DiagnosisChoice, origin: str) -> PatchManifest:
    """The candidate's manifest and patch, written to the store."""
    spec, shots = recipe.apply, plan.shots
    data = delta.to_bytes()
    from .delta import sha256_bytes

    manifest = PatchManifest(
        candidate_id=f"{clock.stamp()}-{spec.method}-s{recipe.seed}",
        method=spec.method,
        base_ref=recipe.model.ref,
        base_fingerprint=ctx.base_fingerprint(),
        parent=version,
        parent_fingerprint=loaded.fingerprint,
        fingerprint=patched_fingerprint(loaded.model, delta),
        strength=1.0,
        patch_sha256=sha256_bytes(data),
        patch_bytes=len(data),
        trainable_params=sum(allowed.values()),
        masks=allowed,
        seed=recipe.seed,
        shots_hash=shots.content_hash(),
        holdout=plan.holdout,
        train_files=[ctx.workspace.portable(s.source) for s in shots.samples],
        cycle=plan.cycle,
        origin="cycle" if plan.cycle else origin,
        diagnosis=chosen.file,
        diagnosis_note=chosen.note,
        recipe=recipe,
        libraries=libraries(),
        metrics=stats,
        created=clock.stamp(),
    )
    store.write_candidate(ctx.workspace, manifest, data)
    ctx.workspace.log("apply", candidate=manifest.candidate_id, method=spec.method, parent=version,
                      trainable_params=manifest.trainable_params, patch_bytes=manifest.patch_bytes,
                      seconds=round(stats.apply_seconds, 2))
    return manifest


def train_preprocess(loaded: LoadedModel, min_scale: float):
    """open_clip's training transform (random resized crops) with the model's own normalization."""
    if min_scale >= 1.0:
        return loaded.preprocess
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(loaded.model)
    return open_clip.image_transform(cfg["size"], is_train=True, mean=cfg["mean"], std=cfg["std"],
                                     interpolation=cfg.get("interpolation"), aug_cfg={"scale": (min_scale, 1.0)})


def reference_logits(ctx: Context, loaded: LoadedModel, recipe: Recipe, fallback: Optional[ImageSet] = None):
    """(images, parent logits, head) for KL distillation, on the recipe's reference set and
    `fallback` (a cycle's earlier labelled images, used without their labels): the first keeps
    what the base knew of other images, the second what earlier nights taught."""
    from .evaluate import loader

    sets = []
    if recipe.reference is not None:
        spec = recipe.reference
        path = ctx.resolve(spec.path).resolve()
        if any(ctx.resolve(g.path).resolve() == path for g in recipe.guard.suites):
            raise UsageError(f"{ctx.workspace.recipe_path}: the reference set {spec.path} is also a guard suite",
                             "distill on other images: a guard suite must stay unseen to measure anything")
        sets.append(open_image_set(path, None, spec.folders, spec.name or "reference", spec.max_per_class, recipe.seed))
    if fallback is not None and len(fallback):
        sets.append(fallback)
    if not sets:
        raise UsageError("apply.retain: distill needs reference images",
                         "set `reference: {path: ...}` in vepatch.yaml (any unlabelled images that are no guard suite)")
    images = merge_sets("reference", sets)
    if len(images) > recipe.apply.distill_images:
        pick = sorted(random.Random(recipe.seed).sample(range(len(images)), recipe.apply.distill_images))
        images = images.subset(pick)
    vocabulary = list(images.classnames)
    if recipe.apply.distill_vocabulary == "imagenet":  # the reference's own classes, then ImageNet's 1000
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        own = {c.lower() for c in vocabulary}
        vocabulary += [c for c in IMAGENET_CLASSNAMES if c.lower() not in own]
    ref_head = text_head(loaded, vocabulary, recipe.templates)
    batches, logits = [], []
    scale = loaded.model.logit_scale.exp().detach()
    with torch.no_grad():
        for x, _ in loader(images, loaded.preprocess, recipe.batch_size):
            batches.append(x)
            logits.append(scale * loaded.model.encode_image(x.to(ctx.device), normalize=True).float().cpu() @ ref_head.T)
    return torch.cat(batches), torch.cat(logits), ref_head


def libraries() -> dict[str, str]:
    import open_clip
    import timm

    return {"vepatch": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "timm": timm.__version__, "python": platform.python_version()}
