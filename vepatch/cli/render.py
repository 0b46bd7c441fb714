"""Rich renderings of records for the terminal (the cli modules print them; the library never does)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .._typed import to_plain
from ..records import UNGUARDED, UNGUARDED_FIX, CaptioningReport, Diagnosis, EvalReport, RetrievalReport


def titled(title: str, **kwargs) -> Table:
    """A table whose title reads on one line: left-aligned, the table at least as wide (to 78)."""
    kwargs.setdefault("title_justify", "left")
    return Table(title=title, min_width=min(len(title) + 2, 78), **kwargs)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def eval_table(report: EvalReport) -> Table:
    table = titled(f"{report.set_name} — {report.version}: accuracy {pct(report.accuracy)} on {report.n} images")
    table.add_column("class")
    table.add_column("n", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("most confused with")
    for i, name in enumerate(report.classnames):
        row = report.confusion[i]
        others = [(c, j) for j, c in enumerate(row) if j != i and c > 0]
        worst = max(others, default=None)
        confused = f"{report.classnames[worst[1]]} ({worst[0]})" if worst else "-"
        table.add_row(name, str(report.per_class_n[i]), pct(report.per_class_recall[i]), confused)
    return table


def retrieval_table(report: RetrievalReport) -> Table:
    table = titled(f"{report.set_name} — {report.version}: retrieval over {report.images} images, "
                   f"{report.captions} distinct captions")
    for col in ("direction", "Recall@1", "Recall@5"):
        table.add_column(col, justify="left" if col == "direction" else "right")
    for direction, label in (("i→t", "image → text"), ("t→i", "text → image")):
        cells = [report.recall.get(f"{direction} R@{k}") for k in (1, 5)]
        table.add_row(label, *[pct(c) if c is not None else "—" for c in cells])
    return table


def captioning_table(report: CaptioningReport) -> Table:
    table = titled(f"{report.set_name} — {report.version}: captions of {report.images} images "
                   f"({report.captions} distinct)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("caption likelihood (mean of exp(-mean token NLL))", pct(report.likelihood))
    return table


def confusion_table(report: EvalReport, width: int = 80) -> Table:
    """The confusion matrix when it fits `width`; otherwise its largest off-diagonal cells."""
    k = len(report.classnames)
    digits = max(len(str(c)) for row in report.confusion for c in row)
    if 17 + k * (max(digits, 5) + 3) <= width:  # a 14-character label column, then k columns of 5+ characters
        table = titled("confusion (rows: true, columns: predicted)")
        table.add_column("", no_wrap=True, max_width=14)
        for name in report.classnames:
            table.add_column(name[:5], justify="right", no_wrap=True)
        for i, name in enumerate(report.classnames):
            table.add_row(name, *[str(c) for c in report.confusion[i]])
        return table
    cells = sorted(((c, i, j) for i, row in enumerate(report.confusion) for j, c in enumerate(row) if i != j and c),
                   reverse=True)[:15]
    table = titled(f"top confusions ({k} classes: the full matrix is in --json)")
    for col in ("true", "predicted as", "images"):
        table.add_column(col, justify="right" if col == "images" else "left", no_wrap=True)
    for c, i, j in cells:
        table.add_row(report.classnames[i], report.classnames[j], str(c))
    return table


def diagnosis_tables(d: Diagnosis, top: int = 12) -> list[Table]:
    confusions = titled(f"{d.n_errors} of {d.n_images} images are errors ({len(d.already_right)} already right, not used)")
    confusions.add_column("true")
    confusions.add_column("predicted")
    confusions.add_column("count", justify="right")
    for c in d.confusions:
        confusions.add_row(c.true, c.predicted, str(c.count))

    blocks = titled(f"blame by block — top 10% of blocks hold {pct(d.concentration_top10)} of it")
    blocks.add_column("block")
    blocks.add_column("share", justify="right")
    for b in d.blocks[:top]:
        blocks.add_row(b.block, pct(b.share))

    loci = titled(f"top loci ({d.control if d.control != 'none' else 'gradient'}-selected: {d.selected_params:,} weights)")
    loci.add_column("rank", justify="right")
    loci.add_column("kind")
    loci.add_column("block")
    loci.add_column("head", justify="right")
    loci.add_column("score", justify="right")
    loci.add_column("selected", justify="right")
    for rank, locus in enumerate(d.loci[:top], 1):
        loci.add_row(
            str(rank), locus.kind, locus.block, str(locus.head) if locus.head >= 0 else "-",
            f"{locus.score:.3g}", f"{locus.selected:,}",
        )
    return [confusions, blocks, loci]


def guard_tables(report) -> list:
    """The verdict at 80 columns: one table at the chosen strength (a refusal: its best try),
    each suite's change and the bound of how bad it could be; then one line per strength tried
    (its target gain and its first failing check) and the rule that chose."""
    from rich import box

    shown = next((t for t in report.trials if t.strength == report.strength), None) if report.accepted else \
        max(report.trials, key=lambda t: t.target_gain_pp)
    label = "chosen" if report.accepted else "best try"
    mean = f"mean guard change {shown.mean_guard_change_pp:+.2f} pp"
    if shown.mean_why:
        mean += f", could be as bad as {shown.mean_bound_pp:+.2f} pp"
    t = titled(f"λ {shown.strength:g} ({label}, each test at {shown.level:.3g}): {mean}",
               box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("suite", "n", "before", "after", "Δ pp", "worst pp", "bar pp", ""):  # a long suite name wraps, the verdict never
        t.add_column(col, justify="left" if col in ("suite", "") else "right", no_wrap=col != "suite")
    for s in shown.suites:
        name = s.name + (" (target)" if s.role == "target" and s.name != "target-holdout" else "")
        t.add_row(name, str(s.n), pct(s.before), pct(s.after), f"{s.change_pp:+.1f}", bound_cell(s), bar_cell(s), suite_mark(s))
    marks = ["chosen" if report.accepted and tr.strength == report.strength else ("pass" if tr.passed else "fail")
             for tr in report.trials]
    lines: list = [t, Text("worst: the one-sided bound; target: the gain is at least this, guard: the change could be as bad "
                           "as this")]
    if any(s.judged and s.passed and s.role == "guard" and not s.certified for s in shown.suites):
        lines.append(Text("ok*: uncertified, too few images to certify its bar; passed because no drop beyond it was shown"))
    lines += [Text(f"λ {tr.strength:g} {m}: target {tr.target_gain_pp:+.1f} pp" + ("" if tr.passed else f"; {tr.first_failure}"))
              for tr, m in zip(report.trials, marks)]
    if report.untried:
        lines.append(Text("not tried: " + ", ".join(f"λ {x:g}" for x in report.untried) + " (a larger strength passed)"))
    if report.rule:
        lines.append(Text(f"rule: {report.rule}"))
    return lines


def bound_cell(s) -> str:
    return "-" if not s.judged else f"{s.bound_pp:+.1f}"


def bar_cell(s) -> str:
    if not s.judged:
        return "-"
    return f"≥{s.bar_pp:+g}" if s.role == "target" else f"-{s.bar_pp:g}"


def suite_mark(s) -> str:
    """ok / FAIL; ok* for a passing guard row that is no certificate; '-' for one not judged."""
    if not s.judged:
        return "at chance"
    if not s.passed:
        return "FAIL"
    return "ok" if s.role == "target" or s.certified else "ok*"


def verdict_lines(report) -> list:
    """The verdict, its reason, and what to do next."""
    chosen = next((t for t in report.trials if t.strength == report.strength), None) if report.accepted else None
    target = next((s for s in chosen.suites if s.role == "target"), None) if chosen else None
    if report.accepted:
        gain = f"{target.name} {pct(target.before)} → {pct(target.after)}" if target else ""
        loose = [s.name for s in chosen.suites if s.role == "guard" and s.judged and not s.certified]
        kept = "guards kept" + (f" ({', '.join(loose)} uncertified: too few images to certify the bar)" if loose else "")
        head = Text.assemble(("ACCEPTED", "bold green"), f" as {report.version} at λ {report.strength:g}: {gain}, {kept}")
        nxt = f"next: vepatch report {report.version} (what it fixed and broke); vepatch rollback undoes it"
    else:
        head = Text.assemble(("REFUSED", "bold red"), f": {report.reason.removeprefix('refused: ')}")
        nxt = (f"fix: {UNGUARDED_FIX}" if UNGUARDED in report.reason else
               f"next: vepatch report {report.candidate_id} shows what it broke;\n"
               "      more or other shots, a smaller --lr or another --method may pass")
    lines = [head]
    notes = report.reason.split(" [", 1)[1].rstrip("]") if report.accepted and " [" in report.reason else ""
    if notes:
        lines.append(Text(f"note: {notes}"))
    return lines + [Text(nxt)]


def log_table(rows, head: str) -> Table:
    t = titled(f"versions (HEAD: {head}); fixed, broke: on each version's holdout")
    for col in ("version", "parent", "method", "λ", "fixed", "broke", "bytes", "made (UTC)"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        outcomes = r.target_outcomes
        wrong_before = sum(o.fixed + o.still_wrong for o in outcomes)
        t.add_row(("* " if r.version == head else "") + r.version, r.parent, r.method, f"{r.strength:g}",
                  f"{sum(o.fixed for o in outcomes)}/{wrong_before}" if outcomes else "-",
                  str(sum(o.newly_wrong for o in outcomes)) if outcomes else "-",
                  f"{r.patch_bytes / 1e6:.1f} MB", f"{r.created[4:6]}-{r.created[6:8]} {r.created[9:11]}:{r.created[11:13]}")
    return t


def show_tables(manifest, report, prompts: dict[str, str] | None = None) -> list[Table]:
    """`prompts`: a prompt patch's parameters -> what each is, in words (prompts.describe)."""
    t = titled(f"{manifest.version or manifest.candidate_id}: {manifest.method} on {manifest.parent}")
    t.add_column("parameter")
    t.add_column("trainable", justify="right")
    for name, count in manifest.masks.items():
        label = prompts[name] if prompts and name in prompts else name.removeprefix("visual.")
        t.add_row(escape(label), f"{count:,}")
    info = titled("facts")
    info.add_column("what")
    info.add_column("value")
    for k, v in [("trainable numbers", f"{manifest.trainable_params:,}"), ("patch bytes", f"{manifest.patch_bytes:,}"),
                 ("strength", f"{manifest.strength:g}"), ("seed", str(manifest.seed)), ("diagnosis", manifest.diagnosis or "-"),
                 *[(k, f"{v:.4g}") for k, v in to_plain(manifest.metrics).items()],
                 ("verdict", "-" if report is None else ("accepted" if report.accepted else "refused") + f": {escape(report.reason)}")]:
        info.add_row(k, v)
    return [t, info] + (guard_tables(report) if report else [])


def stream_table(rounds) -> Table:
    names = list(dict.fromkeys(k for r in rounds for k in r.round_accuracy))
    guards = list(dict.fromkeys(k for r in rounds for k in r.guard_accuracy))
    t = titled("continual rounds: HEAD after each round, on every round's holdout so far")
    for col in ("round", "status", "HEAD", *names, *guards, "chain bytes"):
        t.add_column(col)
    for r in rounds:
        t.add_row(r.round, r.status, r.version, *[pct(r.round_accuracy[k]) if k in r.round_accuracy else "-" for k in names],
                  *[pct(r.guard_accuracy.get(k, 0)) for k in guards], f"{r.chain_bytes:,}")
    return t


def outcomes_table(outcomes, title: str) -> Table:
    t = titled(title)
    for col in ("class", "n", "fixed", "still wrong", "newly wrong", "kept right"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for o in outcomes:
        t.add_row(o.name, str(o.n), str(o.fixed), str(o.still_wrong), str(o.newly_wrong), str(o.kept_right))
    return t


def cycle_report(r) -> list:
    """What a night did, for the morning: the verdict, tonight's holdout per class, bad drops."""
    what = r.version or r.candidate_id or ""
    lines = [Text(f"cycle {r.cycle_id or '-'}: {r.status}{' ' + what if what else ''}"),
             Text(f"  {r.new_images} new image(s), {r.holdout_images} held out, {r.duplicates} seen before"),
             Text(f"  {r.reason}")]
    if r.outcomes:
        label = "the promoted version" if r.status == "promoted" else "the candidate (not promoted)"
        lines.append(outcomes_table(r.outcomes, f"tonight's holdout: what {label} gets right"))
    for q in r.quarantined:
        lines.append(Text(f"quarantined {q.source} -> {q.moved_to}: {q.reason}"))
    if r.report_file:
        lines.append(Text(f"page: {r.report_file} (the images fixed and broke, suite by suite)"))
    if r.status == "refused":
        lines.append(Text(f"next: the candidate is kept for inspection: vepatch show {r.candidate_id} (exit 3)"))
    elif r.status == "promoted":
        lines.append(Text(f"next: vepatch show {r.version}; vepatch log; vepatch rollback undoes it"))
    return lines


def speed_report(r) -> list:
    t = titled(f"{r.model} on {r.device_name} ({r.device}), {r.method}, batch {r.batch_size}")
    for col in ("", "images/s", "TFLOP/s", "of bf16 peak"):
        t.add_column(col)
    for name, rate, tf, mfu in (("patch step", r.step_images_per_s, r.step_achieved_tflops_per_s, r.step_mfu),
                                ("guard pass", r.guard_images_per_s, r.guard_achieved_tflops_per_s, r.guard_mfu)):
        t.add_row(name, f"{rate:.1f}", f"{tf:.3f}", pct(mfu) if mfu else "peak unknown")
    lines = [t, f"{r.trainable_params:,} trainable numbers; {1e3 * r.step_tflops / r.batch_size:.2f} GFLOP per image "
                f"per step; peak memory {r.peak_memory_mb:,.0f} MB"]
    for name, ops in (("patch step", r.step_top_ops), ("guard pass", r.guard_top_ops)):
        lines.append(f"{name} time: " + ", ".join(f"{o.name.removeprefix('aten::')} {100 * o.share:.0f}%" for o in ops))
    return lines
