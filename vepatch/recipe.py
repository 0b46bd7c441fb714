"""The recipe: every default vepatch uses lives here, one comment per field.

Precedence: command-line flags > the workspace's vepatch.yaml > these defaults. A flag
left unset (None) never overrides anything (see `with_overrides`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml

from ._typed import from_plain, ranged, to_plain
from .errors import UsageError

RECIPE_FILE = "vepatch.yaml"
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class ModelSpec:
    ref: str = "default"  # 'default' (embedded), 'local-dir:PATH', 'hf-hub:ORG/NAME' (cached only), or an open_clip model name
    pretrained: str = ""  # with an open_clip model name: a local weights file (.safetensors, or a torch checkpoint)
    online: bool = False  # allow hub downloads; off by default, nothing leaves the machine


@dataclass(frozen=True)
class DataSpec:
    path: str  # image folder (root/<class>/*.jpg), a `datasets` save_to_disk folder, or pkg:MODULE/sub/dir
    name: str = ""  # label in reports; defaults to the folder name
    folders: dict[str, str] = field(default_factory=dict)  # folder name -> class name, where folders are not named after classes
    max_per_class: int = ranged(0, lo=0)  # keep at most this many images per class (seeded choice); 0 keeps all


@dataclass(frozen=True)
class GuardSuite(DataSpec):
    classes: list[str] = field(default_factory=list)  # class names; empty = the folders' own names
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # '{}' or '{c}' stands for the class name
    max_drop_pp: float = ranged(1.0, lo=0)  # refuse if this suite's accuracy drops more than this (PAINT's bar), beyond noise
    optional: bool = False  # a missing folder is skipped with a note instead of an error
    # 'classification': <class>/ folders, accuracy; 'retrieval': images with same-named .txt
    # captions (or a saved dataset with an image and a text column), judged by image->text and
    # text->image Recall@1/5, each against max_drop_pp (README "Retrieval guard suites");
    # 'captioning': the same formats, judged by each image's caption likelihood under the
    # model's text decoder (open_clip CoCa models only; README "Captioning guard suites")
    kind: Literal["classification", "retrieval", "captioning"] = "classification"

    @property
    def label(self) -> str:
        """The suite's name in reports and verdicts: `name`, else its folder's (or built-in's) name."""
        return self.name or PurePosixPath(self.path.split(":", 1)[-1].rstrip("/")).name or self.path


@dataclass(frozen=True)
class DiagnoseSpec:
    fc1_fraction: float = ranged(0.1, lo=0, hi=1, lo_open=True)  # per-layer top-s share of fc1 entries selected (LoRSU paper: 10%)
    heads_per_layer: int = ranged(2, lo=0)  # per-layer top-k attention heads selected (LoRSU paper: 2)
    max_samples: int = ranged(1000, lo=1)  # gradient scoring uses at most this many images (as LoRSU's code)
    batch_size: int = ranged(32, lo=1)  # images per backward pass while scoring
    control: Literal["none", "random"] = "none"  # 'random': same budget at random places (the localization control)


@dataclass(frozen=True)
class ApplySpec:
    method: str = "lorsu"  # a name from vepatch/methods/ (`vepatch apply --help` lists them)
    shots: int = ranged(16, lo=1)  # training images per class, sampled from the shot pool
    holdout_per_class: int = ranged(0, lo=0)  # target holdout images per class; 0 = every pool image not used for shots
    epochs: int = ranged(30, lo=1)  # passes over the shots
    batch_size: int = ranged(16, lo=1)  # images per optimizer step
    lr: float = ranged(0.0, lo=0)  # Adam learning rate (cosine decay to lr/10, per step); 0 = method_lr's, else the method's own (Method.lr)
    method_lr: dict[str, float] = field(default_factory=dict)  # per method, where apply.lr is 0 (a recipe's tuned rates: recipes/textile-vit.yaml)
    rank: int = ranged(8, lo=1)  # LoRA rank r for heads, projection and the `lora` baseline
    lora_alpha: float = ranged(8.0, lo=0, lo_open=True)  # LoRA alpha (scale alpha/r)
    augment_scale: float = ranged(0.5, lo=0, hi=1, lo_open=True)  # training crops: RandomResizedCrop with this minimum area share; 1.0 = no augmentation
    train_biases: bool = False  # also train fc1 and Q/K/V biases, unmasked (LoRSU's official code does)
    # 'ce': cross-entropy over the frozen class-text head; 'contrastive': CLIP loss, random templates;
    # 'cafe': 'ce' + caption_weight * the text decoder's captioning loss on the shots' class captions (CAFe; CoCa models only)
    loss: Literal["ce", "contrastive", "cafe"] = "ce"
    caption_weight: float = ranged(1.0, lo=0)  # apply.loss: cafe: weight of the captioning loss beside the classification loss
    l2: float = ranged(0.0, lo=0)  # weight of the L2 penalty on the delta
    # how an update keeps earlier fixes (README "Continual"): 'replay' = shots from every class
    # labelled so far; 'batch-classes' = tonight's classes, cross-entropy over the classes
    # present in each batch; 'distill' = tonight's classes + KL to the parent on reference
    # images; 'replay+distill' = both; 'none' = tonight's classes, plain cross-entropy.
    # Outside a cycle, only the loss part (batch-classes) and distillation (with `reference:`) apply.
    retain: Literal["replay", "batch-classes", "distill", "replay+distill", "none"] = "replay"
    distill: float = ranged(1.0, lo=0)  # weight of KL(parent || candidate) when apply.retain is 'distill'
    distill_images: int = ranged(256, lo=1)  # reference images kept in memory for distillation
    # the classes the parent's and the candidate's distributions are compared over: 'reference' =
    # the reference set's own (a cycle's: the recipe's classes); 'imagenet' = those plus ImageNet's
    # 1000 class names (open_clip ships them; ZSCL's idea: a wide vocabulary keeps what the base knew)
    distill_vocabulary: Literal["reference", "imagenet"] = "reference"
    # stored type of the patch's values and factors: 'float16' or 'bfloat16' halve its bytes (the
    # change is still applied in float32; README "The embedded ViT base" gives the rounding error)
    patch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    wise_alpha: float = ranged(0.5, lo=0, hi=1)  # full+wise: weight of the fine-tuned model in the average (WiSE-FT's default)
    codebook: int = ranged(64, lo=2)  # ck-coop: K-means centres of the token-embedding table each learned token mixes
    vision_prompts: int = ranged(8, lo=1)  # dcar on a ViT: learned prompt tokens after the class token
    prompt_pad: int = ranged(16, lo=1)  # dcar on a CNN: width in pixels of the learned image border (its visual prompt)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def replays(self) -> bool:
        """A cycle trains on every class labelled so far, not only tonight's."""
        return self.retain in ("replay", "replay+distill")

    @property
    def distills(self) -> bool:
        """The loss adds KL(parent || candidate) on reference images."""
        return self.retain in ("distill", "replay+distill")

    @property
    def learning_rate(self) -> float:
        """apply.lr, else this method's entry in apply.method_lr, else the method's own default."""
        from .methods import get

        return self.lr or self.method_lr.get(self.method) or get(self.method).lr


@dataclass(frozen=True)
class GuardSpec:
    """The acceptance rule (acceptance.py; README "Guard statistics"). Every test is one-sided at
    alpha / len(strengths), so the verdict's error rates hold over the whole strength search."""

    suites: list[GuardSuite] = field(default_factory=list)  # what the model must keep doing well
    min_target_gain_pp: float = 2.0  # the target holdout must gain this much, and the gain must be shown by a one-sided exact test; <= 0: no gain required
    max_mean_drop_pp: float = ranged(1.0, lo=0)  # the upper bound of the mean drop over the recipe's judged suites may not exceed this
    alpha: float = ranged(0.05, lo=0, hi=1, lo_open=True)  # error rate of the verdict: split evenly over the strengths (Bonferroni)
    # a suite too small to certify its bar at any churn (268 images for 1 pp at 0.05, more at a
    # smaller level): 'lenient' = it refuses only when its drop is shown beyond the bar (its lower
    # bound), and the verdict names it uncertified; 'strict' = it refuses
    small_suites: Literal["strict", "lenient"] = "lenient"
    strengths: list[float] = ranged(factory=lambda: [0.25, 0.5, 0.75, 1.0], lo=0, hi=1, lo_open=True, nonempty=True)  # lambda values, tried from the largest down; the first that passes is promoted
    holdout_max_drop_pp: float = ranged(1.0, lo=0)  # bar for the pooled holdouts of earlier accepted versions (they guard too)
    # each recipe suite's bar also holds against the base model, not only against tonight's
    # baseline: drops that each night allows cannot add up over many nights
    cumulative: bool = True
    allow_unguarded: bool = False  # promote even when no prior-task suite was judged (all absent, skipped or at chance)


@dataclass(frozen=True)
class CycleSpec:
    holdout_share: float = ranged(0.3, lo=0, hi=1, lo_open=True, hi_open=True)  # of each class's new images, set aside as tonight's target holdout (never trained on)
    max_same_failure: int = ranged(2, lo=1)  # a cycle failing this many times in a row with the same error is set aside
    # a drop whose size or mtime changed less than this many seconds before the scan (or while
    # it was read) is still being copied: it waits in the inbox for the next run, never
    # quarantined. Two minutes: far longer than a copy of one image takes, and only the drops
    # of a night's last two minutes wait a night (`vepatch cycle --settle 0` for a drop you know is complete)
    settle_s: float = ranged(120.0, lo=0)


@dataclass(frozen=True)
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    classes: list[str] = field(default_factory=list)  # target class names; errors/<folder> maps onto these
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # prompts; '{}' or '{c}' is the class
    shot_pool: DataSpec | None = None  # labelled target images for apply's shots and holdout (cycle: optional extra pool)
    reference: DataSpec | None = None  # images to distill the parent on (apply.retain: distill, replay+distill); never a guard suite
    inbox: str = "inbox"  # where operators drop misclassified images (<class>/*.jpg), for `cycle`
    seed: int = ranged(0, lo=0)  # one seed for sampling, masks and training
    batch_size: int = ranged(32, lo=1)  # images per forward pass in eval and guard (fastest on the CPU: README, Speed)
    diagnose: DiagnoseSpec = field(default_factory=DiagnoseSpec)
    apply: ApplySpec = field(default_factory=ApplySpec)
    guard: GuardSpec = field(default_factory=GuardSpec)
    cycle: CycleSpec = field(default_factory=CycleSpec)


def load_recipe(path: Path) -> Recipe:
    """Read a recipe YAML; unknown keys and wrong types are errors naming the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UsageError(f"{path}: recipe not found", "check the path, or run `vepatch init`") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}:{line} is not valid YAML", "fix the syntax") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe is a mapping of keys", "see recipes/default.yaml")
    return check_recipe(from_plain(Recipe, data, where=f"{path}:"), f"{path}:")


def check_recipe(recipe: Recipe, where: str = "flags:") -> Recipe:
    """Types and choices checked again after flags were applied (a flag bypasses the YAML
    loader), and what types alone cannot say: the method must be a registered one."""
    from .methods import REGISTRY

    from_plain(Recipe, to_plain(recipe), where=where)

    if recipe.apply.method not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(recipe.apply.method, list(REGISTRY), n=1)
        raise UsageError(f"{where} apply.method '{recipe.apply.method}' is not a method",
                         f"did you mean '{close[0]}'?" if close else f"use one of: {', '.join(REGISTRY)}")
    for name, lr in recipe.apply.method_lr.items():
        if name not in REGISTRY or not lr > 0:
            raise UsageError(f"{where} apply.method_lr: {name}: {lr}" + (" is not a method" if name not in REGISTRY else " is not > 0"),
                             f"use method names ({', '.join(REGISTRY)}) with learning rates above 0")
    names: dict[str, str] = {}
    for suite in recipe.guard.suites:
        if suite.label == "target-holdout" or re.fullmatch(r"(v\d+-holdout|history(-\d+)?)", suite.label):
            raise UsageError(f"{where} guard suite name '{suite.label}' ({suite.path}) is reserved for holdouts",
                             "give the suite another `name:`")
        if suite.label in names:
            raise UsageError(f"{where} guard suites {names[suite.label]} and {suite.path} are both named '{suite.label}'",
                             "give one of them its own `name:`")
        names[suite.label] = suite.path
        if suite.kind != "classification" and (suite.classes or suite.folders or suite.max_per_class):
            raise UsageError(f"{where} guard suite '{suite.label}' is a {suite.kind} suite: its captions are its classes",
                             "leave classes, folders and max_per_class out of it")
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML. `apply.lr: 0` means "the method's own" and is left out, so the file
    never shows a learning rate of 0 (README: the default is each method's)."""
    plain = to_plain(recipe)
    if not plain["apply"]["lr"]:
        del plain["apply"]["lr"]
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)


def with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Apply dotted-key overrides ('apply.shots': 16); None means 'not given' and is skipped."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        recipe = _replace_path(recipe, parents, leaf, value)
    return check_recipe(recipe)


def _replace_path(obj: Any, parents: list[str], leaf: str, value: Any) -> Any:
    if not parents:
        names = {f.name for f in dataclasses.fields(obj)}
        if leaf not in names:
            raise UsageError(f"unknown recipe key '{leaf}'", f"known: {', '.join(sorted(names))}")
        return dataclasses.replace(obj, **{leaf: value})
    head, *rest = parents
    return dataclasses.replace(obj, **{head: _replace_path(getattr(obj, head), rest, leaf, value)})
