import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tiny
from vepatch.cli import app

runner = CliRunner()
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands():
    return sorted(c.name or c.callback.__name__ for c in app.registered_commands)


@pytest.mark.parametrize("name", _commands())
def test_every_command_has_help_and_is_in_the_readme(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert re.search(rf"vepatch {name}\b", README), f"README does not show `vepatch {name}`"


def test_init_eval_diagnose_json(make_workspace, vit_bundle, tmp_path):
    root = make_workspace(vit_bundle)
    data = tiny.make_folder(tmp_path / "holdout", 4)
    result = runner.invoke(app, ["eval", str(data), "-C", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 12 and 0 <= report["accuracy"] <= 1
    assert report["classnames"] == tiny.CLASSES and sum(map(sum, report["confusion"])) == 12

    result = runner.invoke(app, ["diagnose", str(data), "-C", str(root), "--json"])
    if result.exit_code == 4:  # the random tiny model got everything right: nothing to diagnose
        pytest.skip("random tiny model made no error")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    diag = out["diagnosis"]
    assert Path(out["file"]).is_file() and (Path(out["file"]).parent / diag["masks_file"]).is_file()
    assert diag["n_errors"] + len(diag["already_right"]) == 12
    assert diag["loci"][0]["score"] >= diag["loci"][-1]["score"]
    log = [json.loads(l) for l in (root / ".vepatch" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["init", "eval", "diagnose"]


def test_outside_a_workspace_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["diagnose", str(tmp_path)])
    assert result.exit_code == 2
    assert "not inside a vepatch workspace" in result.output and "vepatch init" in result.output


def test_unknown_class_folder_exits_1_with_one_line(make_workspace, vit_bundle, tmp_path):
    root = make_workspace(vit_bundle)
    errors = tiny.make_folder(tmp_path / "errors", 1, classes=["red square", "zebra"])
    result = runner.invoke(app, ["diagnose", str(errors), "-C", str(root)])
    assert result.exit_code == 1
    assert "unknown class 'zebra'" in result.output and "Traceback" not in result.output


def test_nothing_to_diagnose_exits_4(make_workspace, vit_bundle, tmp_path, monkeypatch):
    import vepatch.diagnose as diag_mod
    from vepatch.runtime.passes import Predictions

    root = make_workspace(vit_bundle)
    errors = tiny.make_folder(tmp_path / "errors", 2)
    monkeypatch.setattr(diag_mod, "predict", lambda loaded, head, s, *args, **kw: Predictions(
        __import__("numpy").array(s.labels), __import__("numpy").array(s.labels)))
    result = runner.invoke(app, ["diagnose", str(errors), "-C", str(root)])
    assert result.exit_code == 4 and "already classifies all" in result.output


def test_small_messages_say_the_right_thing(make_workspace, vit_bundle, tmp_path, monkeypatch):
    root = make_workspace(vit_bundle)
    result = runner.invoke(app, ["show", "base", "-C", str(root)])
    assert result.exit_code == 2 and "is the model itself" in result.output
    assert "lr: 0" not in (root / "vepatch.yaml").read_text()  # "the method's own" is left out, not written as 0
    one = tiny.make_folder(tmp_path / "one", 2, classes=["zebra"])
    result = runner.invoke(app, ["eval", str(one), "-C", str(root)])
    assert result.exit_code == 1 and "only class folder 'zebra'" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("vepatch ")
    assert "<bool>" not in runner.invoke(app, ["apply", "--help"]).output
    monkeypatch.chdir(tmp_path)  # outside a workspace, a model is named by its reference, not "base"
    two = tiny.make_folder(tmp_path / "two", 2)
    result = runner.invoke(app, ["eval", str(two), "--model", f"local-dir:{vit_bundle}", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == f"local-dir:{vit_bundle}"


def test_the_confusion_matrix_becomes_top_confusions_when_it_does_not_fit():
    from rich.console import Console

    from vepatch.cli.render import confusion_table
    from vepatch.records import EvalReport

    def report(k):
        confusion = [[5 if i == j else (3 if j == (i + 1) % k else 0) for j in range(k)] for i in range(k)]
        return EvalReport(set_name="s", version="base", classnames=[f"class number {i}" for i in range(k)], n=8 * k,
                          accuracy=0.6, per_class_recall=[0.6] * k, per_class_n=[8] * k, confusion=confusion)

    for k in (3, 12):
        console = Console(width=80, record=True)
        console.print(confusion_table(report(k), 80))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 80
        assert ("top confusions" in text) == (k == 12)
        assert "class number 0" in text


NO_MODEL = [["--help"], ["aply"], ["apply", "--method", "lorsa"], ["log"], ["log", "--json"], ["show", "v9"],
            ["report", "v9"], ["rollback", "v9"]]


def test_commands_that_need_no_model_never_import_torch(make_workspace, vit_bundle):
    """Usage errors, --help and the store's readers answer without importing torch (the
    seconds it costs: examples/startup_time.py measures them)."""
    import subprocess
    import sys

    root = make_workspace(vit_bundle)
    script = ("import sys\nfrom typer.testing import CliRunner\nfrom vepatch.cli import app\n"
              f"for args in {NO_MODEL!r}:\n"
              f"    result = CliRunner().invoke(app, args + (['-C', {str(root)!r}] if args[0] not in ('--help', 'aply') else []))\n"
              "    assert result.exit_code in (0, 2), (args, result.output)\n"
              "    assert 'torch' not in sys.modules, args\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
