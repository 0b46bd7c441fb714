"""`vepatch speed`: the patch step it times is the method's own trainable set, its FLOP count is
consistent, and the guard's fast path agrees with the plain one."""

import json

from typer.testing import CliRunner

import tiny
from vepatch.cli import app
from vepatch.models import load_model
from vepatch.speed import measure

runner = CliRunner()


def test_step_counts_the_methods_trainable_set_and_backward_flops(vit_bundle):
    loaded = load_model(f"local-dir:{vit_bundle}")
    params = sum(p.numel() for p in loaded.model.visual.parameters())
    lorsu = measure(loaded, "tiny", "lorsu", 4, 2, "cpu")
    full = measure(load_model(f"local-dir:{vit_bundle}"), "tiny", "full", 4, 2, "cpu")
    assert full.trainable_params == params
    assert 0 < lorsu.trainable_params < params / 4
    # a step is forward + backward: about 2-3 forward passes (the guard pass is one), plus LoRA's extras
    guard_flops_per_batch = lorsu.guard_achieved_tflops_per_s / lorsu.guard_images_per_s * 4
    assert 1.5 * guard_flops_per_batch < lorsu.step_tflops < 3.5 * guard_flops_per_batch
    assert full.step_tflops > lorsu.step_tflops  # every weight gradient is computed
    assert lorsu.step_images_per_s > 0 and lorsu.guard_images_per_s > 0 and lorsu.peak_memory_mb > 0
    assert lorsu.step_mfu == 0.0 and lorsu.peak_tflops_per_s == 0.0  # a CPU's peak is not guessed
    assert lorsu.step_top_ops and abs(sum(o.share for o in lorsu.step_top_ops)) <= 1.0


def test_speed_command_and_guard_timing(make_workspace, vit_bundle, tmp_path):
    from vepatch.recipe import ApplySpec, DataSpec, GuardSpec, GuardSuite

    result = runner.invoke(app, ["speed", "--model", f"local-dir:{vit_bundle}", "--batch-size", "2", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step_images_per_s"] > 0
    root = make_workspace(
        vit_bundle, shot_pool=DataSpec(path=str(tiny.make_folder(tmp_path / "pool", 10, seed=5)), name="pool"),
        apply=ApplySpec(shots=4, epochs=1, batch_size=4),
        guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path=str(tiny.make_folder(tmp_path / "g", 5, seed=9)), name="g", max_drop_pp=100.0)], min_target_gain_pp=-100.0),
    )
    assert runner.invoke(app, ["apply", "-C", str(root), "--diagnosis", "none"]).exit_code == 0
    result = runner.invoke(app, ["speed", "--guard", "latest", "-C", str(root), "--json"])
    assert result.exit_code == 0, result.output
    timing = json.loads(result.stdout)
    assert timing["identical"] and timing["passes"] == 2 and timing["every_strength_passes"] == 5 and timing["images"] == 15 + 18
