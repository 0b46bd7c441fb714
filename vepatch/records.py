"""Frozen records that round-trip to JSON. Every file vepatch writes carries schema_version;
`read_record` drops keys it does not know (written by a newer vepatch) and fills defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ._typed import from_plain, to_plain
from .recipe import Recipe

SCHEMA_VERSION = 1
T = TypeVar("T")


def to_json(record: Any) -> str:
    return json.dumps(to_plain(record), indent=2, sort_keys=False)


def from_json(cls: type[T], text: str, where: str = "") -> T:
    return from_plain(cls, json.loads(text), where=where or cls.__name__, strict=False)


def read_record(cls: type[T], path: Path) -> T:
    return from_json(cls, path.read_text(encoding="utf-8"), where=str(path))


@dataclass(frozen=True)
class SkippedFile:
    source: str
    reason: str


@dataclass(frozen=True)
class EvalReport:
    """Accuracy of one model version on one labelled set."""

    set_name: str
    version: str  # 'base', 'v3', or a candidate id
    classnames: list[str]
    n: int
    accuracy: float
    per_class_recall: list[float]  # in classnames order; NaN-free: classes with no image get 0 and n=0
    per_class_n: list[int]
    confusion: list[list[int]]  # [true][predicted]
    skipped: list[SkippedFile] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class RetrievalReport:
    """Recall@K of one model version on a retrieval set (images with captions), both directions."""

    set_name: str
    version: str
    images: int
    captions: int  # distinct captions: the image->text candidates and the text->image queries
    recall: dict[str, float]  # 'i→t R@1', 'i→t R@5', 't→i R@1', 't→i R@5' -> 0..1
    skipped: list[SkippedFile] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class CaptioningReport:
    """How likely a model version's text decoder finds a captioning suite's own captions."""

    set_name: str
    version: str
    images: int
    captions: int  # distinct captions
    likelihood: float  # mean over images of exp(-mean token NLL) of the image's caption, in (0, 1]
    skipped: list[SkippedFile] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Confusion:
    true: str
    predicted: str
    count: int


@dataclass(frozen=True)
class Misclassified:
    source: str  # the image file (or dataset row)
    true: str
    predicted: str


@dataclass(frozen=True)
class Locus:
    """One place in the vision tower that the diagnosis blames."""

    kind: Literal["fc1", "head"]  # a block's MLP first layer, or one attention head's Q/K/V rows
    block: str  # module path of the block, e.g. 'transformer.resblocks.3'
    param: str  # full parameter name inside the model, e.g. 'visual.transformer.resblocks.3.mlp.c_fc.weight'
    head: int  # head index for 'head' loci, -1 for 'fc1'
    score: float  # blame: sum of (mean grad * weight)^2 over the locus (first-order Taylor)
    grad_score: float  # LoRSU's score: sum of squared mean gradients over the locus
    selected: int  # entries (fc1) or Q/K/V rows (head) the masks select here


@dataclass(frozen=True)
class BlockScore:
    block: str
    score: float  # blame of the block's fc1 and Q/K/V weights
    share: float  # of the whole tower's blame


@dataclass(frozen=True)
class Diagnosis:
    """What `vepatch diagnose` found: where, what and which examples."""

    created: str  # UTC timestamp, also the file name
    version: str  # the model version diagnosed ('base', 'v3')
    fingerprint: str  # of that version's vision tower
    errors_dir: str
    n_images: int
    n_errors: int  # misclassified images: the ones scored
    already_right: list[str]  # images the model already classifies right (reported, not used)
    confusions: list[Confusion]
    loci: list[Locus]  # ranked, highest score first
    blocks: list[BlockScore]  # ranked
    concentration_top10: float  # share of the total score held by the top 10% of blocks
    fc1_fraction: float
    heads_per_layer: int
    control: Literal["none", "random"]
    seed: int
    masks_file: str  # safetensors beside this record: one boolean mask per parameter
    selected_params: int  # entries the masks select in total
    skipped: list[SkippedFile] = field(default_factory=list)
    misclassified: list[Misclassified] = field(default_factory=list)  # every error image and what it was taken for
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class HoldoutRef:
    """A target holdout, kept so that later guards can re-check an accepted fix."""

    name: str
    classnames: list[str]
    templates: list[str]
    sources: list[str]
    labels: list[int]


@dataclass(frozen=True)
class ApplyStats:
    """What one training run took."""

    steps: int
    final_loss: float
    apply_seconds: float
    peak_memory_mb: float  # CUDA peak allocated, or the process's peak RSS on CPU
    shots: int  # training images


@dataclass(frozen=True)
class PatchManifest:
    """patch.json (accepted versions) / candidate.json (candidates): what a delta is and how it was made."""

    candidate_id: str
    method: str
    base_ref: str
    base_fingerprint: str
    parent: str  # 'base' or 'vN'
    parent_fingerprint: str
    fingerprint: str  # of the vision tower after applying this delta (at `strength`) to the parent
    strength: float  # lambda the delta is stored at (1.0 for candidates)
    patch_sha256: str
    patch_bytes: int
    trainable_params: int  # numbers that can change: the sum of `masks` (not what the patch file stores)
    masks: dict[str, int]  # param -> trainable numbers there (masked entries, or LoRA factors' unmasked rows)
    seed: int
    shots_hash: str
    holdout: HoldoutRef
    diagnosis: str  # the diagnosis file whose masks were used ('' if computed on the shots)
    recipe: Recipe  # the resolved recipe
    libraries: dict[str, str]
    metrics: ApplyStats
    created: str
    version: str = ""  # 'vN' once accepted
    train_files: list[str] = field(default_factory=list)  # the images trained on (holdout.sources: held out)
    cycle: str = ""  # the cycle that trained it ('' for `vepatch apply`)
    origin: Literal["apply", "cycle", "bench"] = "apply"  # who made it; `guard` with no argument judges only 'apply' ones
    diagnosis_note: str = ""  # why the newest diagnosis was passed over, in one line ('' if it was used, or none was there)
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class SuiteResult:
    """One suite at one strength. A guard row passes when the one-sided upper bound of its drop
    is within its bar (acceptance.py); the target when its gain is shown by a one-sided test."""

    name: str
    role: Literal["target", "guard"]
    n: int
    before: float
    after: float
    change_pp: float
    p_value: float  # target: exact one-sided McNemar p of a gain; guard: p of "the drop is at or beyond the bar" (Tango's score test; a captioning row: the bootstrap's share)
    passed: bool
    why: str
    bound_pp: float = 0.0  # the one-sided bound at the strength's level: guard: the change could be as bad as this; target: the gain is at least this
    bar_pp: float = 0.0  # guard: the drop allowed; target: the gain required
    certified: bool = False  # guard: the bound is within the bar; target: the gain is shown (p below the level, gain at least required)
    needed_images: int = 0  # guard, not certified: images a suite needs to certify its bar at this churn and drop (-1: no size can)
    judged: bool = True  # False: reported only (the baseline reads the suite at chance)


@dataclass(frozen=True)
class StrengthResult:
    strength: float
    suites: list[SuiteResult]
    mean_guard_change_pp: float  # over the recipe's judged guard suites (not earlier holdouts)
    passed: bool
    why: str
    level: float = 0.05  # each test's level at this strength: guard.alpha / the number of strengths the search may try
    mean_bound_pp: float = 0.0  # the mean change could be as bad as this (MOVER over the suites' bounds)
    mean_why: str = ""

    @property
    def target_gain_pp(self) -> float:
        return sum(s.change_pp for s in self.suites if s.role == "target")

    @property
    def first_failure(self) -> str:
        """The first check that failed at this strength, in words ('' when it passed)."""
        if self.passed:
            return ""
        failed = next((r for r in self.suites if not r.passed), None)
        return f"{failed.name}: {failed.why}" if failed is not None else self.why


@dataclass(frozen=True)
class ClassOutcome:
    """What a patch did to one class of the target holdout, image by image."""

    name: str
    n: int
    fixed: int  # wrong before, right after
    still_wrong: int  # wrong before and after
    newly_wrong: int  # right before, wrong after
    kept_right: int  # right before and after


UNGUARDED = ("nothing guarded: no prior-task suite was judged (every one absent, skipped or read at chance by the "
             "baseline)")
UNGUARDED_FIX = ("add a guard suite the model reads above chance (guard.suites in vepatch.yaml; e.g. builtin:fashion-mnist), "
                 "or set guard.allow_unguarded: true to promote without one")


@dataclass(frozen=True)
class GuardReport:
    """guard.json: the verdict on one candidate against one baseline."""

    candidate_id: str
    baseline: str
    baseline_fingerprint: str
    accepted: bool
    strength: float  # the chosen lambda (0 when refused)
    trials: list[StrengthResult]
    reason: str
    predictions_sha256: dict[str, str]  # suite -> hash of the chosen model's per-example predictions
    created: str
    version: str = ""  # the version written, when accepted
    target_outcomes: list[ClassOutcome] = field(default_factory=list)  # per class, at the chosen strength (refused: the best try)
    rule: str = ""  # how the strength was chosen, in words
    untried: list[float] = field(default_factory=list)  # strengths the search did not need (a larger one passed)
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class VersionSummary:
    """One version as `vepatch log` lists it: what it is, not every file it saw (`show` has those)."""

    version: str
    parent: str
    method: str
    strength: float
    candidate_id: str
    cycle: str
    created: str
    patch_bytes: int
    trainable_params: int
    train_images: int
    holdout_images: int
    target_outcomes: list[ClassOutcome]  # the verdict's, per class of the target holdout
