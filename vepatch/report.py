"""Self-contained HTML pages (no network, no script: thumbnails embedded as data: URIs, charts
as inline SVG): `vepatch report` for a verdict — what the patch fixed and broke, image by
image — and `vepatch diagnose --report` for the errors. Pages are built from the store's
records; the only I/O here is reading the images for thumbnails."""

from __future__ import annotations

import base64
import io
import itertools
import math
from html import escape
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .evidence import Evidence, SuiteEvidence
from .records import Diagnosis, GuardReport, PatchManifest, StrengthResult

THUMB_PX = 72  # thumbnails' longer side
MAX_THUMBS = 40  # per suite and kind (fixed / broke); the rest are counted

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
.ok{color:#17692b}.bad{color:#a4161a}.muted{color:#666}
table{border-collapse:collapse;margin:6px 0 12px}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child,td.l,th.l{text-align:left}th{background:#f6f6f6}
.grid{display:flex;flex-wrap:wrap;gap:8px}.cell{width:96px;font-size:11px;text-align:center}
.cell img{width:72px;height:72px;object-fit:contain;image-rendering:pixelated;border:2px solid #ccc;background:#fafafa}
.fixed img{border-color:#17692b}.broke img{border-color:#a4161a}
.verdict{font-size:15px;padding:8px 12px;border-radius:4px;margin:8px 0}
.verdict.ok{background:#e8f5ea}.verdict.bad{background:#fbe9e9}
"""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy k/n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pct_ci(correct: np.ndarray) -> str:
    k, n = int(correct.sum()), len(correct)
    lo, hi = wilson(k, n)
    return f"{100 * k / max(n, 1):.1f}% <span class=muted>[{100 * lo:.0f}–{100 * hi:.0f}]</span>"


def table(head: list[str], rows: list[list[str]], left: int = 1, last_left: bool = False) -> str:
    """Cells are HTML already (callers escape what they did not write). The first `left`
    columns (and the last, with `last_left`: a text column) are left-aligned, the rest right."""
    def cls(i: int) -> str:
        return " class=l" if i < left or (last_left and i == len(head) - 1) else ""

    ths = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(head))
    trs = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{ths}</tr>{trs}</table>"


def bar_chart(items: list[tuple[str, float]], title: str, unit: str = "%") -> str:
    """Horizontal bars, inline SVG."""
    if not items:
        return ""
    top = max(v for _, v in items) or 1.0
    row, width, label_w = 18, 360, 190
    bars = []
    for i, (name, value) in enumerate(items):
        y = i * row
        w = width * value / top
        bars.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="12">{escape(name)}</text>'
                    f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="#4a78b5"/>'
                    f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" font-size="11">{value:.1f}{unit}</text>')
    height = row * len(items)
    return (f'<figure><figcaption>{escape(title)}</figcaption><svg width="{label_w + width + 60}" height="{height}" '
            f'role="img" aria-label="{escape(title)}">{"".join(bars)}</svg></figure>')


def thumbnail(load: Callable[[], "object"]) -> str:
    """A data: URI of a small PNG of the image `load()` returns ('' if unreadable now)."""
    try:
        image = load().convert("RGB")
    except Exception:
        return ""
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_loader(root: Path, suite: SuiteEvidence) -> Callable[[int], Callable[[], "object"]]:
    """Index -> a loader of that example's image (files, or rows of a saved dataset)."""
    from .data import open_holdout
    from .records import HoldoutRef

    images = open_holdout(HoldoutRef(suite.name, suite.classnames, [], suite.sources, suite.labels.tolist()), root)
    return lambda i: (lambda: images.load(images.samples[i]))


def gallery(kind: str, suite: SuiteEvidence, indices: np.ndarray, loader: Callable[[int], Callable[[], object]]) -> str:
    names = suite.classnames
    by_class = [[i for i in indices if suite.labels[i] == k] for k in range(len(names))]
    shown = [i for group in itertools.zip_longest(*by_class) for i in group if i is not None]  # every class, in turn
    return grid(kind, kind, suite, shown, loader, lambda i: f"true <b>{escape(names[suite.labels[i]])}</b><br>"
                f"{escape(names[suite.before[i]])} → {escape(names[suite.after[i]])}")


def score_gallery(kind: str, suite: SuiteEvidence, indices: np.ndarray, loader: Callable[[int], Callable[[], object]]) -> str:
    """A captioning suite's images whose caption likelihood rose ('fixed') or fell ('broke'),
    the biggest change first: the caption, and its likelihood before -> after."""
    label = {"fixed": "likelier captions", "broke": "less likely captions"}[kind]
    return grid(kind, label, suite, list(indices), loader, lambda i: f"{escape(suite.classnames[suite.labels[i]])}<br>"
                f"{100 * suite.before[i]:.1f}% → {100 * suite.after[i]:.1f}%")


def grid(kind: str, label: str, suite: SuiteEvidence, shown: list, loader: Callable[[int], Callable[[], object]],
         caption: Callable[[int], str]) -> str:
    """Thumbnails of the first MAX_THUMBS of `shown`, each with its caption (HTML)."""
    if len(shown) == 0:
        return f"<p class=muted>{label}: none</p>"
    cells = []
    for i in shown[:MAX_THUMBS]:
        uri = thumbnail(loader(int(i)))
        img = f'<img src="{uri}" alt="{escape(Path(suite.sources[i]).name)}">' if uri else "<div class=muted>(unreadable)</div>"
        cells.append(f'<div class="cell {kind}">{img}<br>{caption(i)}</div>')
    more = f"<p class=muted>and {len(shown) - MAX_THUMBS} more</p>" if len(shown) > MAX_THUMBS else ""
    return f"<h3>{label} ({len(shown)})</h3><div class=grid>{''.join(cells)}</div>{more}"


def per_class(suite: SuiteEvidence) -> str:
    rows = []
    for k, name in enumerate(suite.classnames):
        m = suite.labels == k
        if not m.any():
            continue
        before, after = suite.before[m] == k, suite.after[m] == k
        rows.append([escape(name), str(int(m.sum())), pct_ci(before), pct_ci(after),
                     str(int((~before & after).sum())), str(int((before & ~after).sum()))])
    return table(["class", "n", "before [95% CI]", "after [95% CI]", "fixed", "broke"], rows)


def trial_at(report: GuardReport, strength: float) -> Optional[StrengthResult]:
    return next((t for t in report.trials if t.strength == strength), None)


def suites_table(report: GuardReport, proof: Evidence) -> str:
    trial = trial_at(report, proof.strength)
    results = {s.name: s for s in trial.suites} if trial else {}
    rows = []
    for s in proof.suites:
        r = results.get(s.name)
        verdict = "" if r is None else (f"<span class={'ok' if r.passed else 'bad'}>{'ok' if r.passed else 'FAIL'}</span>: "
                                        f"{escape(r.why)}")
        if s.scores:  # mean caption likelihoods (no binomial interval for a mean of values); fixed/broke: rose/fell
            before, after = f"{100 * np.mean(s.before):.1f}%", f"{100 * np.mean(s.after):.1f}%"
            change = 100 * (np.mean(s.after) - np.mean(s.before)) if len(s.labels) else 0.0
        else:
            before, after = pct_ci(s.before == s.labels), pct_ci(s.after == s.labels)
            change = 100 * (np.mean(s.after == s.labels) - np.mean(s.before == s.labels)) if len(s.labels) else 0.0
        judged = r is not None and r.judged
        bound = f"{r.bound_pp:+.1f} pp" if judged else "-"
        bar = "-" if not judged else (f"≥ {r.bar_pp:+.1f} pp" if s.role == "target" else f"−{r.bar_pp:g} pp")
        rows.append([escape(s.name), s.role, str(len(s.labels)), before, after,
                     f"{change:+.1f} pp", str(len(s.fixed)), str(len(s.broke)), bound, bar, verdict])
    head = ["suite", "role", "n", "before [95% CI]", "after [95% CI]", "change", "fixed", "broke", "bound", "bar", "verdict"]
    level = f"{trial.level:.3g}" if trial else "-"
    note = (f"<p class=muted>bound: one-sided at {level}; for the target the gain is at least this, for a guard suite "
            "the change could be as bad as this. A guard suite passes when its bound is within its bar.</p>")
    return table(head, rows, left=2, last_left=True) + note


def strengths_table(report: GuardReport) -> str:
    rows = [[f"{t.strength:g}", "<span class=ok>pass</span>" if t.passed else "<span class=bad>fail</span>",
             f"{t.target_gain_pp:+.1f} pp", f"{t.mean_guard_change_pp:+.2f} pp",
             f"{t.mean_bound_pp:+.2f} pp" if t.mean_why else "-", escape(t.first_failure or t.why)] for t in report.trials]
    rows += [[f"{x:g}", "not tried", "-", "-", "-", "a larger strength passed"] for x in report.untried]
    rule = f"<p class=muted>rule: {escape(report.rule)}</p>" if report.rule else ""
    return table(["λ", "", "target gain", "mean guard change", "could be as bad as", "first failing check"], rows,
                 last_left=True) + rule


def touches(manifest: PatchManifest) -> str:
    """Trainable numbers per block: where the patch is allowed to change the tower."""
    per_block: dict[str, int] = {}
    for name, count in manifest.masks.items():
        parts = name.removeprefix("visual.").split(".")
        block = ".".join(parts[:3]) if len(parts) > 3 else ".".join(parts[:-1]) or parts[0]
        per_block[block] = per_block.get(block, 0) + count
    total = sum(per_block.values()) or 1
    chart = bar_chart([(b, 100 * c / total) for b, c in per_block.items()], "share of the trainable numbers, per block")
    rows = [[escape(n.removeprefix("visual.")), f"{c:,}"] for n, c in manifest.masks.items()]
    return chart + "<details><summary>every parameter</summary>" + table(["parameter", "trainable numbers"], rows) + "</details>"


def diagnosis_section(d: Diagnosis) -> str:
    conf = table(["true", "predicted as", "images"], [[escape(c.true), escape(c.predicted), str(c.count)] for c in d.confusions[:15]], left=2)
    blocks = bar_chart([(b.block, 100 * b.share) for b in d.blocks[:12]], "share of the blame, per block (top 12)")
    heads = [locus for locus in d.loci if locus.kind == "head"][:10]
    loci = table(["kind", "block", "head", "blame", "selected"],
                 [[locus.kind, escape(locus.block), str(locus.head) if locus.head >= 0 else "-", f"{locus.score:.3g}",
                   f"{locus.selected:,}"] for locus in d.loci[:15]], left=2)
    scored = "attention heads and fc1 scored" if heads else "fc1 scored (this tower has no attention heads)"
    facts = (f"<p>{d.n_errors} of {d.n_images} images in <code>{escape(d.errors_dir)}</code> misclassified by "
             f"{escape(d.version)}; the top 10% of blocks hold {100 * d.concentration_top10:.0f}% of the blame"
             f"{' (random control)' if d.control != 'none' else ''}; {scored}.</p>")
    return facts + "<h3>confusions</h3>" + conf + blocks + "<h3>top loci</h3>" + loci


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def verdict_page(root: Path, manifest: PatchManifest, report: GuardReport, proof: Evidence,
                 diagnosis: Optional[Diagnosis]) -> str:
    """The page `vepatch report` writes for one judged candidate or version."""
    name = report.version or manifest.candidate_id
    accepted = report.accepted
    headline = (f"ACCEPTED as {report.version or '(not promoted)'} at λ {report.strength:g}" if accepted else
                f"REFUSED (best try shown: λ {proof.strength:g})")
    parts = [f"<h1>vepatch report: {escape(name)}</h1>",
             f"<div class='verdict {'ok' if accepted else 'bad'}'><b>{headline}</b> — {escape(report.reason)}</div>",
             table(["", ""], [[k, escape(v)] for k, v in [
                 ("candidate", manifest.candidate_id), ("method", manifest.method), ("parent", manifest.parent),
                 ("baseline judged against", report.baseline), ("trainable numbers", f"{manifest.trainable_params:,}"),
                 ("patch bytes", f"{manifest.patch_bytes:,}"), ("trained on", f"{len(manifest.train_files)} images"),
                 ("made (UTC)", manifest.created), ("judged (UTC)", report.created)]]),
             "<h2>suites: baseline vs candidate</h2>", suites_table(report, proof),
             "<h2>strengths tried</h2>", strengths_table(report)]
    for s in proof.suites:
        loader = image_loader(root, s)
        parts.append(f"<h2>{escape(s.name)} ({s.role}): what changed, image by image</h2>")
        if s.scores:  # per image, not per class: its caption's likelihood before -> after
            parts += [score_gallery("fixed", s, s.fixed, loader), score_gallery("broke", s, s.broke, loader)]
        else:
            parts += [per_class(s), gallery("fixed", s, s.fixed, loader), gallery("broke", s, s.broke, loader)]
    parts.append("<h2>what the patch touches</h2>" + touches(manifest))
    parts.append("<h2>diagnosis</h2>" + (diagnosis_section(diagnosis) if diagnosis else
                                        "<p class=muted>none: the masks were scored on the training shots</p>"))
    return page(f"vepatch report {name}", "".join(parts))


def write_verdict_report(ws, name: str, out: Optional[Path] = None) -> Path:
    """Write the page of a judged version ('vN') or candidate (its id) to `out` (default:
    reports/<name>.html in the workspace); returns where."""
    from . import evidence, store
    from .errors import UsageError
    from .fsio import write_text_atomic
    from .records import read_record

    if store.VERSION_RE.match(name):
        folder, manifest = store.version_dir(ws, name), store.read_manifest(ws, name)
    else:
        folder, (manifest, _) = ws.candidate_dir(name), store.read_candidate(ws, name)
    if not (folder / store.GUARD_FILE).is_file():
        raise UsageError(f"{name}: not judged yet", f"run `vepatch guard {name}` first")
    verdict = read_record(GuardReport, folder / store.GUARD_FILE)
    proof = evidence.read(folder / store.EVIDENCE_FILE)
    made_by = ws.diagnosis_file(manifest.diagnosis.removesuffix(".json")) if manifest.diagnosis else None
    diagnosis = read_record(Diagnosis, made_by) if made_by is not None and made_by.is_file() else None
    path = out or ws.root / "reports" / f"{name}.html"
    write_text_atomic(path, verdict_page(ws.root, manifest, verdict, proof, diagnosis))
    return path


def diagnosis_page(root: Path, d: Diagnosis) -> str:
    """The page `vepatch diagnose --report` writes: the errors, what they were taken for, the blame."""
    classnames = sorted({m.true for m in d.misclassified} | {m.predicted for m in d.misclassified})
    index = {c: k for k, c in enumerate(classnames)}
    suite = SuiteEvidence("errors", "target", classnames, [m.source for m in d.misclassified],
                          np.array([index[m.true] for m in d.misclassified], dtype=np.int64),
                          np.array([index[m.predicted] for m in d.misclassified], dtype=np.int64),
                          np.array([index[m.predicted] for m in d.misclassified], dtype=np.int64))
    cells = []
    if d.misclassified:
        loader = image_loader(root, suite)
        for i, m in enumerate(d.misclassified[:MAX_THUMBS * 2]):
            uri = thumbnail(loader(i))
            img = f'<img src="{uri}" alt="{escape(Path(m.source).name)}">' if uri else "<div class=muted>(unreadable)</div>"
            cells.append(f'<div class="cell broke">{img}<br>true <b>{escape(m.true)}</b><br>taken for {escape(m.predicted)}</div>')
    gallery_html = (f"<h2>misclassified images ({len(d.misclassified)})</h2><div class=grid>{''.join(cells)}</div>"
                    if cells else "")
    body = (f"<h1>vepatch diagnosis {escape(d.created)}</h1>" + diagnosis_section(d) + gallery_html)
    return page(f"vepatch diagnosis {d.created}", body)


def bench_page(title: str, markdown_table: str, png: bytes, note: str = "") -> str:
    """bench.html: the bench's table (from its markdown) and its plot, in one page."""
    lines = [ln.strip().strip("|").split("|") for ln in markdown_table.strip().splitlines() if ln.strip().startswith("|")]
    head, rows = ([c.strip() for c in lines[0]], [[escape(c.strip()) for c in ln] for ln in lines[2:]]) if lines else ([], [])
    img = f'<img alt="{escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}" style="max-width:100%">'
    return page(title, f"<h1>{escape(title)}</h1>" + (f"<p>{escape(note)}</p>" if note else "")
                + table([escape(h) for h in head], rows) + img)
