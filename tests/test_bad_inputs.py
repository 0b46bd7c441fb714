"""Every bad or hostile input: one line naming the thing and the fix, the right exit code."""

import hashlib
import json
import os
import pickle

import pytest
import torch
from typer.testing import CliRunner

import tiny
from vepatch.cli import app
from vepatch.recipe import ApplySpec, DataSpec, GuardSpec

runner = CliRunner()


@pytest.fixture
def ws(make_workspace, vit_bundle, tmp_path):
    pool = tiny.make_folder(tmp_path / "pool", 6, seed=5)
    return make_workspace(vit_bundle, shot_pool=DataSpec(path=str(pool)),
                          apply=ApplySpec(shots=2, epochs=1, augment_scale=1.0),
                          guard=GuardSpec(min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0], allow_unguarded=True))


@pytest.fixture
def promoted(ws):
    assert runner.invoke(app, ["apply", "-C", str(ws), "--diagnosis", "none"]).exit_code == 0
    assert runner.invoke(app, ["guard", "-C", str(ws)]).exit_code == 0
    return ws


def _patch(ws):
    return ws / ".vepatch" / "patches" / "v0001" / "patch.safetensors"


def _rewrite_manifest_sha(ws):
    manifest = ws / ".vepatch" / "patches" / "v0001" / "patch.json"
    data = json.loads(manifest.read_text())
    data["patch_sha256"] = hashlib.sha256(_patch(ws).read_bytes()).hexdigest()
    manifest.write_text(json.dumps(data))


def errors_unknown_class(ws, tmp_path):
    tiny.make_folder(tmp_path / "e", 1, classes=["red square", "zebra"])
    return ["diagnose", str(tmp_path / "e")], 1, "unknown class 'zebra'"


def errors_nothing_readable(ws, tmp_path):
    d = tmp_path / "e" / "red_square"
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("hi")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    outside = tmp_path / "secret.png"
    tiny.draw(0, __import__("numpy").random.default_rng(0)).save(outside)
    os.symlink(outside, d / "link.png")
    return ["diagnose", str(tmp_path / "e")], 1, "no readable image"


def errors_empty(ws, tmp_path):
    (tmp_path / "e").mkdir()
    return ["diagnose", str(tmp_path / "e")], 1, "no class folders"


def errors_missing(ws, tmp_path):
    return ["diagnose", str(tmp_path / "nope")], 1, "not a folder"


def recipe_wrong_type(ws, tmp_path):
    (ws / "vepatch.yaml").write_text((ws / "vepatch.yaml").read_text().replace("shots: 2", "shots: two"))
    return ["apply"], 2, "apply.shots: expected a whole number"


def recipe_unknown_key(ws, tmp_path):
    (ws / "vepatch.yaml").write_text((ws / "vepatch.yaml").read_text() + "gaurd_suites: []\n")
    return ["apply"], 2, "unknown key 'gaurd_suites'"


def recipe_inbox_outside(ws, tmp_path):
    (ws / "vepatch.yaml").write_text((ws / "vepatch.yaml").read_text().replace("inbox: inbox", f"inbox: {tmp_path}"))
    return ["cycle"], 2, "is outside the workspace"


def patch_truncated(promoted, tmp_path):
    _patch(promoted).write_bytes(_patch(promoted).read_bytes()[:100])
    _rewrite_manifest_sha(promoted)
    return ["eval", str(tmp_path / "pool"), "--version", "v1"], 1, "not a valid safetensors"


def patch_tampered(promoted, tmp_path):
    data = bytearray(_patch(promoted).read_bytes())
    data[-1] ^= 0xFF
    _patch(promoted).write_bytes(bytes(data))
    return ["eval", str(tmp_path / "pool"), "--version", "v1"], 1, "sha256 mismatch"


def patch_pickle_renamed(promoted, tmp_path):
    _patch(promoted).write_bytes(pickle.dumps({"visual.proj#dense": torch.zeros(2)}))
    _rewrite_manifest_sha(promoted)
    return ["eval", str(tmp_path / "pool"), "--version", "v1"], 1, "not a valid safetensors"


def patch_other_base(promoted, tmp_path):
    other = tiny.build_bundle(tmp_path / "other", "vit", seed=7)
    text = (promoted / "vepatch.yaml").read_text()
    start = text.index("local-dir:")
    end = text.index("\n", start)
    (promoted / "vepatch.yaml").write_text(text[:start] + f"local-dir:{other}" + text[end:])
    return ["eval", str(tmp_path / "pool"), "--version", "v1"], 1, "another fingerprint"


def hf_hub_offline(ws, tmp_path):
    return ["eval", str(tmp_path / "pool"), "--model", "hf-hub:nobody/no-such-model"], 1, "not in the local Hugging Face cache"


CASES = [errors_unknown_class, errors_nothing_readable, errors_empty, errors_missing, recipe_wrong_type,
         recipe_unknown_key, recipe_inbox_outside, hf_hub_offline]
PATCH_CASES = [patch_truncated, patch_tampered, patch_pickle_renamed, patch_other_base]


def _check(root, case, tmp_path):
    args, code, message = case(root, tmp_path)
    result = runner.invoke(app, [*args, "-C", str(root)])
    assert result.exit_code == code, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert lines[0].startswith("error:") and any(l.strip().startswith("fix:") for l in lines)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input(ws, tmp_path, case):
    _check(ws, case, tmp_path)


@pytest.mark.parametrize("case", PATCH_CASES, ids=lambda c: c.__name__)
def test_bad_patch_is_refused_never_loaded(promoted, tmp_path, case):
    _check(promoted, case, tmp_path)


def test_cuda_out_of_memory_is_retried_then_one_clear_error(ws, tmp_path, monkeypatch):
    from vepatch.runtime.passes import SuiteInputs

    sizes = []

    def oom(self, model, device, keep):
        sizes.append(self.batch_size)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(SuiteInputs, "_run", oom)
    result = runner.invoke(app, ["eval", str(tmp_path / "pool"), "-C", str(ws), "--batch-size", "8"])
    assert result.exit_code == 1 and "out of memory even at batch size 1" in result.output
    assert sizes == [8, 4, 2, 1]


@pytest.mark.parametrize("args,message", [
    (["apply", "--shots", "0"], "apply.shots: 0 is out of range"),
    (["apply", "--shots", "-3"], "apply.shots: -3 is out of range"),
    (["apply", "--epochs", "0"], "apply.epochs: 0 is out of range"),
    (["apply", "--method", "lorsa"], "did you mean 'lora'"),
    (["apply", "--device", "tpu"], "'tpu' is not one of"),
])
def test_bad_flags_fail_at_once_before_the_model_loads(ws, monkeypatch, args, message):
    from vepatch.context import Context

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(Context, "model", no_model)
    result = runner.invoke(app, [*args, "-C", str(ws)])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.startswith("error:")


WRITERS = [["apply"], ["diagnose", "errors"], ["guard"], ["rollback", "base"], ["gc", "--yes"], ["cycle"],
           ["bench", "--methods", "ln"], ["export", "v1", "--out", "exported"]]


def test_every_writer_takes_the_workspace_lock_before_anything_else(ws, tmp_path, monkeypatch):
    """Another process holds the lock: each command that writes the store exits 5 at once —
    before it loads a model — and the store is as it was."""
    import subprocess
    import sys

    from vepatch.context import Context

    def no_model(*_, **__):
        raise AssertionError("a model was loaded while another process held the lock")

    monkeypatch.setattr(Context, "model", no_model)

    tiny.make_folder(ws / "errors", 2, seed=3)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from vepatch.workspace import Workspace\n"
        f"with Workspace(Path({str(ws)!r})).lock():\n"
        "    print('held', flush=True); sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # no race: the lock is held before any command starts
        before = sorted(p.relative_to(ws) for p in (ws / ".vepatch").rglob("*"))
        for args in WRITERS:
            result = runner.invoke(app, [*args, "-C", str(ws)])
            assert result.exit_code == 5, (args, result.output)
            assert "holds the workspace lock" in result.output
        assert sorted(p.relative_to(ws) for p in (ws / ".vepatch").rglob("*")) == before
    finally:
        holder.communicate("")
