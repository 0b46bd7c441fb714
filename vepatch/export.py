"""Export a version as a merged open_clip `local-dir:` bundle (plain open_clip loads it),
or, where the patch is plain LoRA, as a peft adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import UsageError
from .fsio import write_bytes_atomic, write_text_atomic
from .models import LoadedModel
from .models.load import embedded_bundle


def _source_config(ref: str) -> tuple[dict, Path | None]:
    folder = embedded_bundle(ref) or (Path(ref.removeprefix("local-dir:")) if ref.startswith("local-dir:") else None)
    if folder is None:
        import open_clip

        cfg = open_clip.get_model_config(ref)
        if cfg is None:
            raise UsageError(f"cannot export '{ref}'", "export works for default, default-vit, local-dir: and open_clip names")
        return {"model_cfg": cfg, "preprocess_cfg": {}}, None
    return json.loads((folder / "open_clip_config.json").read_text()), folder


EXPORT_MARKERS = ("open_clip_config.json", "adapter_config.json")  # what an earlier export left


def check_out(out: Path, force: bool, base_folder: Path | None = None) -> Path:
    """Where an export may write: never the base model's own bundle, never a folder holding
    something other than an earlier export unless `force`."""
    out = out.resolve()
    if base_folder is not None and (out == base_folder.resolve() or base_folder.resolve() in out.parents):
        raise UsageError(f"{out}: is the base model's own bundle", "export to another folder (--out)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file", "export to a folder (--out)")
    if out.is_dir() and any(out.iterdir()) and not force and not any((out / m).is_file() for m in EXPORT_MARKERS):
        raise UsageError(f"{out}: is not empty and holds no earlier export", "export to a new folder, or pass --force")
    return out


def export_bundle(loaded: LoadedModel, ref: str, out: Path, version: str, force: bool = False) -> Path:
    """Write open_clip_config.json + open_clip_model.safetensors of the merged model."""
    from safetensors.torch import save

    config, folder = _source_config(ref)
    out = check_out(out, force, folder)
    out.mkdir(parents=True, exist_ok=True)
    text_cfg = config["model_cfg"].get("text_cfg", {})
    if folder is not None and text_cfg.get("hf_model_name"):
        # the HF text tower's config and tokenizer travel with the bundle
        for item in folder.iterdir():
            if item.is_file() and item.suffix in (".json", ".txt") and item.name != "open_clip_config.json":
                shutil.copy2(item, out / item.name)
        if Path(text_cfg["hf_model_name"]).resolve() == folder.resolve():
            text_cfg["hf_model_name"] = str(out)
            text_cfg["hf_tokenizer_name"] = str(out)
    from .prompts import BANK, EXPORT_FILE, export_bytes
    from .visual_prompts import PREFIX as VISUAL_PROMPTS

    # learned prompt vectors (text and visual) are not open_clip weights: they go beside them
    # (prompts.install reads them)
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()
             if not k.startswith((BANK + ".", VISUAL_PROMPTS))}
    write_bytes_atomic(out / "open_clip_model.safetensors",
                       save(state, metadata={"vepatch_version": version, "fingerprint": loaded.fingerprint}))
    learned = export_bytes(loaded.model)
    if learned is not None:
        write_bytes_atomic(out / EXPORT_FILE, learned)
    else:
        (out / EXPORT_FILE).unlink(missing_ok=True)  # an earlier export's, not this version's
    write_text_atomic(out / "open_clip_config.json", json.dumps(config, indent=2))
    return out


def export_peft(delta, out: Path, rank: int, alpha: float, force: bool = False) -> Path:
    """A plain-LoRA delta as a peft adapter folder (adapter_config.json + adapter_model.safetensors).
    `rank` and `alpha` are the ones the patch was trained with (its manifest's recipe);
    target_modules are full module names, so they match the vision tower only."""
    import torch
    from safetensors.torch import save

    from . import __version__

    if any(not k.endswith(("#lowrank.up", "#lowrank.down")) for k in delta.tensors):
        raise UsageError("this patch is not plain LoRA", "use the default bundle export (--format open_clip)")
    out = check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    tensors, targets = {}, set()
    for name in delta.params:
        module = _peft_module(name)
        targets.add(module)
        up = delta.tensors[f"{name}#lowrank.up"].float() / (alpha / rank)  # peft applies the scale itself
        tensors[f"base_model.model.{module}.lora_A.weight"] = delta.tensors[f"{name}#lowrank.down"].float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = up.contiguous()
        if name.endswith(".in_proj_weight"):  # peft's attention LoRA also adapts out_proj: by nothing
            width = delta.tensors[f"{name}#lowrank.down"].shape[1]
            tensors[f"base_model.model.{module}.base_layer.out_proj.lora_A.weight"] = torch.zeros(rank, width)
            tensors[f"base_model.model.{module}.base_layer.out_proj.lora_B.weight"] = torch.zeros(width, rank)
    write_bytes_atomic(out / "adapter_model.safetensors", save(tensors))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(targets),
              "lora_dropout": 0.0, "bias": "none", "vepatch_version": __version__}
    write_text_atomic(out / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True))
    return out


def _peft_module(param: str) -> str:
    """The module peft targets for a changed parameter: an attention's fused Q/K/V belongs to
    the nn.MultiheadAttention module itself, any other weight to its own module."""
    return param.removesuffix(".in_proj_weight") if param.endswith(".in_proj_weight") else param.removesuffix(".weight")
