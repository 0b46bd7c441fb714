"""`vepatch report` and `diagnose --report`: self-contained pages showing what a patch fixed
and broke, image by image; rendered in a real headless browser where chromium is installed."""

import base64
import re
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

import tiny
from vepatch import evidence, store
from vepatch.cli import app
from vepatch.recipe import ApplySpec, DataSpec, GuardSpec, GuardSuite

runner = CliRunner()


@pytest.fixture
def judged(make_workspace, vit_bundle, tmp_path):
    pool = tiny.make_folder(tmp_path / "pool", 10, seed=5)
    guard_set = tiny.make_folder(tmp_path / "guardset", 6, seed=9)
    root = make_workspace(vit_bundle, shot_pool=DataSpec(path=str(pool), name="pool"),
                          apply=ApplySpec(shots=5, epochs=4, batch_size=5, lr=3e-2, augment_scale=1.0),
                          guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
                                          min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0]))
    errors = tiny.make_folder(tmp_path / "errors", 4, seed=11)
    diag = runner.invoke(app, ["diagnose", str(errors), "-C", str(root), "--report", str(tmp_path / "diagnosis.html")])
    assert diag.exit_code in (0, 4), diag.output
    for args in (["apply"], ["guard"]):
        result = runner.invoke(app, [*args, "-C", str(root)])
        assert result.exit_code == 0, result.output
    return root, tmp_path


def test_the_guard_keeps_per_example_evidence_that_matches_its_verdict(judged):
    root, _ = judged
    ws = store.Workspace(root)
    proof = evidence.read(ws.version_dir(1) / store.EVIDENCE_FILE)
    verdict = store.read_verdict(ws, "v1")
    trial = next(t for t in verdict.trials if t.strength == proof.strength)
    by_name = {s.name: s for s in trial.suites}
    assert [s.name for s in proof.suites] == [s.name for s in trial.suites]
    for s in proof.suites:
        assert len(s.sources) == len(s.labels) == by_name[s.name].n
        assert np.mean(s.before == s.labels) == pytest.approx(by_name[s.name].before)
        assert np.mean(s.after == s.labels) == pytest.approx(by_name[s.name].after)
    target = proof.suites[0]
    assert sum(o.fixed for o in verdict.target_outcomes) == len(target.fixed)
    assert sum(o.newly_wrong for o in verdict.target_outcomes) == len(target.broke)


def test_report_page_shows_the_verdict_every_suite_and_the_changed_images(judged):
    root, tmp_path = judged
    result = runner.invoke(app, ["report", "v1", "-C", str(root), "--out", str(tmp_path / "v1.html")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "v1.html").read_text()
    assert "ACCEPTED as v1" in html and "http://" not in html and "https://" not in html  # self-contained
    for suite in ("target-holdout", "colours"):
        assert f"<h2>{suite} (" in html
    proof = evidence.read(store.Workspace(root).version_dir(1) / store.EVIDENCE_FILE)
    changed = sum(min(len(s.fixed), 40) + min(len(s.broke), 40) for s in proof.suites)
    assert html.count('src="data:image/png;base64,') == changed
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', html)[:3]:
        assert base64.b64decode(uri)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_candidate_not_judged_has_no_report(make_workspace, vit_bundle, tmp_path):
    pool = tiny.make_folder(tmp_path / "pool", 6, seed=5)
    root = make_workspace(vit_bundle, shot_pool=DataSpec(path=str(pool)), apply=ApplySpec(shots=2, epochs=1))
    result = runner.invoke(app, ["apply", "-C", str(root), "--json", "--diagnosis", "none"])
    cid = store.candidates(store.Workspace(root))[0]
    result = runner.invoke(app, ["report", cid, "-C", str(root)])
    assert result.exit_code == 2 and "not judged yet" in result.output


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium here (Debian: apt-get install chromium)")


@pytest.mark.parametrize("page", ["v1.html", "diagnosis.html"])
def test_the_pages_render_in_a_headless_browser(judged, page):
    """Chromium loads the page offline and paints it: the screenshot is a real image, mostly
    white page with the tables' and thumbnails' ink on it, and the DOM it built keeps the tables."""
    from PIL import Image

    root, tmp_path = judged
    if page == "v1.html":
        assert runner.invoke(app, ["report", "v1", "-C", str(root), "--out", str(tmp_path / page)]).exit_code == 0
    elif not (tmp_path / page).is_file():
        pytest.skip("the random tiny model made no error to diagnose")
    browser = _chromium()
    shot = tmp_path / (page + ".png")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", (tmp_path / page).as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file()
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (1600, 1200)
    ink = (image.sum(axis=2) < 600).mean()
    assert 0.005 < ink < 0.5  # something was painted, and it is not a blank or an error page filled dark
    dom = subprocess.run([browser, *flags, "--dump-dom", (tmp_path / page).as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<table") >= 2 and "<img" in dom
