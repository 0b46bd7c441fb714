"""Training on an accelerator: the tower and everything kept beside it move together. Checked on
the CPU with the `meta` device standing in for a GPU (a move to it replaces every tensor)."""

import copy
import dataclasses

import torch

from vepatch.context import open_context
from vepatch.methods.trainable import Trainable
from vepatch.models import load_model
from vepatch.models.towers import describe_tower


def test_trainable_moves_the_parents_values_and_masks_with_the_tower(vit_bundle):
    loaded = load_model(f"local-dir:{vit_bundle}")
    tower = describe_tower(loaded.model)
    trainable = Trainable.frozen(copy.deepcopy(loaded.model.visual))
    fc1 = tower.fc1[0]
    trainable.add_masked(fc1, torch.rand(trainable.parameter(fc1).shape) < 0.1)
    trainable.add_lowrank(tower.qkv[0], 2, 2.0)
    trainable.to("meta")
    p, original, mask = trainable.masked[fc1]
    assert p is trainable.parameter(fc1)  # still the tower's own parameter, not a stale CPU one
    assert {p.device.type, original.device.type, mask.device.type} == {"meta"}
    tower_params = {id(q) for q in trainable.visual.parameters()}
    assert all(id(q) in tower_params and q.device.type == "meta" for q in trainable.params)  # what the optimizer steps


def test_a_command_s_models_live_on_its_device(make_workspace, vit_bundle):
    """`apply` after a separate `diagnose` scores nothing, so nothing else moves the model:
    the context does, once, for every model it hands out."""
    ctx = dataclasses.replace(open_context(make_workspace(vit_bundle)), device="meta")
    loaded, _ = ctx.model()
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
