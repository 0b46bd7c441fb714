"""How fast a patch step and a guard pass run, against the hardware's limit.

`vepatch speed` measures, on synthetic images of the model's input size (no data loading):
  patch step   forward + cross-entropy over a text-head-shaped matrix + backward + Adam step +
               mask enforcement, for a method's trainable set (the same calls as train(); LoRSU
               masks are drawn at random with LoRSU's budget: same shapes, same cost);
  guard pass   no-grad forward + argmax, the guard's inner loop.
FLOPs come from torch's FlopCounterMode over one step (matmuls and convolutions, forward and
backward as executed), so utilisation = achieved FLOP/s / the device's dense bf16 peak. Where
the time goes is the profiler's top operators for one step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .masks import build_masks
from .methods import get as get_method
from .methods.train import Objective, peak_memory_mb, train_step
from .models import LoadedModel
from .models.towers import describe_tower
from .recipe import ApplySpec, DiagnoseSpec
from .runtime.passes import autocast as autocast_for

# Dense bf16 tensor-core peak, FLOP/s, by device name (vendor data sheets, no sparsity).
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


@dataclass(frozen=True)
class OpShare:
    name: str
    share: float  # of the profiled step's self time


@dataclass(frozen=True)
class SpeedReport:
    model: str
    device: str
    device_name: str
    method: str
    batch_size: int
    trainable_params: int
    step_images_per_s: float
    step_tflops: float  # FLOPs of one patch step / 1e12
    step_achieved_tflops_per_s: float
    guard_images_per_s: float
    guard_achieved_tflops_per_s: float
    peak_tflops_per_s: float  # the device's dense bf16 peak (0 = unknown, e.g. a CPU)
    step_mfu: float  # achieved / peak (0 when the peak is unknown)
    guard_mfu: float
    peak_memory_mb: float  # CUDA peak allocated, or the process's peak RSS
    step_top_ops: list[OpShare]
    guard_top_ops: list[OpShare]


def device_peak(device: str) -> tuple[str, float]:
    if not device.startswith("cuda"):
        import platform

        return platform.processor() or "cpu", 0.0
    name = torch.cuda.get_device_name()
    for key, peak in BF16_PEAK.items():
        if key in name:
            return name, peak
    return name, 0.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _top_ops(fn, device: str, k: int = 6) -> list[OpShare]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with _native_stderr_silenced(), profile(activities=activities) as prof:
        fn()
        _sync(device)
    attr = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [OpShare(e.key, getattr(e, attr) / total) for e in events[:k]]


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's C++ side logs its start and stop to fd 2 whatever the log level."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _rate(fn, device: str, steps: int, images: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return steps * images / (time.perf_counter() - start)


def measure(loaded: LoadedModel, model_name: str, method: str, batch_size: int, steps: int, device: str,
            spec: Optional[ApplySpec] = None, classes: int = 10) -> SpeedReport:
    """Time `loaded`'s guard pass, then its patch step for `method` (this adds the method's
    trainable parametrizations to `loaded.model`: use a model loaded for the purpose)."""
    import open_clip

    spec = spec or ApplySpec(method=method)
    model = loaded.model.to(device).eval()
    tower = describe_tower(model)
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    size = size if isinstance(size, int) else size[0]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(classes, (batch_size,), generator=generator).to(device)
    cuda = device.startswith("cuda")
    with torch.inference_mode():
        dim = model.encode_image(images[:1]).shape[-1]
    head = torch.nn.functional.normalize(torch.randn(classes, dim, generator=generator), dim=-1).to(device)
    scale = torch.tensor(100.0, device=device)
    autocast = autocast_for(device)

    def guard_forward():  # what passes.SuiteInputs runs per batch
        with autocast:
            (model.encode_image(images, normalize=True).float() @ head.T).argmax(1)

    guard_pass = torch.inference_mode()(guard_forward)

    def guard_counted():  # grad mode on keeps torch off its fused attention kernel, which
        with torch.enable_grad():  # FlopCounterMode cannot see into: same math, all of it counted
            guard_forward()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    guard_pass()  # warm-up
    guard_flops = _flops(guard_counted)
    guard_rate = _rate(guard_pass, device, steps, batch_size)
    guard_ops = _top_ops(guard_pass, device)

    masks = None
    chosen = get_method(method)
    if chosen.side != "vision":
        from .errors import UsageError

        raise UsageError(f"--method {method} learns prompts, not the vision tower's step this tool times",
                         "time a vision method (lorsu, lora, ...); a prompt patch's cost is `vepatch apply`'s seconds")
    if chosen.needs_masks:  # LoRSU's budget at random places: the same shapes and cost
        targets = tower.fc1 + (tower.qkv if chosen.masks != "logit-norm" else [])
        params = dict(model.named_parameters())
        budget = DiagnoseSpec()
        masks = build_masks({n: torch.empty(params[n].shape, device="meta") for n in targets},
                            dataclasses.replace(tower, qkv=[n for n in tower.qkv if n in targets]),
                            budget.fc1_fraction, budget.heads_per_layer, "random")
    trainable = chosen.make(model.visual, tower, masks, spec)
    trainable.visual.to(device)
    optimizer = torch.optim.Adam(trainable.params, lr=1e-4)
    objective = Objective(head, scale)

    def step():  # train()'s own step, with the recipe's defaults (cross-entropy, no l2, no distillation)
        train_step(trainable, optimizer, images, labels, objective, spec, autocast, generator)

    step()  # warm-up: optimizer state, kernels
    step_flops = _flops(step)
    step_rate = _rate(step, device, steps, batch_size)
    step_ops = _top_ops(step, device)

    name, peak = device_peak(device)
    step_tf = step_flops * step_rate / batch_size / 1e12
    guard_tf = guard_flops * guard_rate / batch_size / 1e12
    return SpeedReport(
        model_name, device, name, method, batch_size, sum(trainable.summary.values()),
        step_rate, step_flops / 1e12, step_tf, guard_rate, guard_tf, peak / 1e12,
        step_tf * 1e12 / peak if peak else 0.0, guard_tf * 1e12 / peak if peak else 0.0,
        peak_memory_mb(device.split(":")[0]), step_ops, guard_ops,
    )


@dataclass(frozen=True)
class GuardTiming:
    candidate_id: str
    images: int  # per pass, over all suites
    passes: int  # the baseline + one per strength the search tried (it stops at the first that passes)
    entry: str  # where kept inputs enter ('' = the preprocessed images)
    plain_seconds: float  # every pass decodes and runs the whole tower; no cache
    fast_cold_seconds: float  # kept inputs; empty prediction cache
    fast_warm_seconds: float  # kept inputs; the baseline's predictions already cached
    identical: bool  # the three gave the same trials and per-example predictions
    every_strength_seconds: float = 0.0  # kept inputs, empty cache, every strength evaluated (the search before it stopped early)
    every_strength_passes: int = 0


def time_guard(ctx, candidate_id: Optional[str]) -> GuardTiming:
    """The guard's strength search on a candidate three ways, in this process, one after another."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from . import store
    from .guard import guard_suites, search_strengths
    from .runtime.passes import outputs
    from .runtime.predcache import PredictionCache

    manifest, delta = store.read_candidate(ctx.workspace, candidate_id or store.newest_candidate(ctx.workspace))
    parent, _ = ctx.model(manifest.parent)
    suites, _ = guard_suites(ctx, parent, manifest, manifest.parent)
    spec, bs, device = ctx.recipe.guard, ctx.recipe.batch_size, ctx.device

    def timed(**kw):
        start = time.perf_counter()
        result = search_strengths(parent, delta, suites, spec, bs, device, **kw)
        return result, time.perf_counter() - start

    plain, plain_s = timed(keep_bytes=0)
    with tempfile.TemporaryDirectory() as folder:
        cache = PredictionCache(Path(folder))
        cold, cold_s = timed(cache=cache)
        warm, warm_s = timed(cache=cache)
    with tempfile.TemporaryDirectory() as folder:
        _, every_s = timed(cache=PredictionCache(Path(folder)), every=True)

    def same(a, b) -> bool:
        return a[0] == b[0] and all(np.array_equal(outputs(a[1][k][n]), outputs(b[1][k][n])) for k in a[1] for n in a[1][k]) \
            and all(np.array_equal(outputs(a[2][n]), outputs(b[2][n])) for n in a[2])

    return GuardTiming(manifest.candidate_id, sum(len(s.images) for s in suites), 1 + len(cold[0]),
                       describe_tower(parent.model).entry_for(delta.params), plain_s, cold_s, warm_s,
                       same(plain, cold) and same(plain, warm), every_s, 1 + len(spec.strengths))
