"""Workspace commands: init, eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import command, emit_json, err, out
from .progress_view import progress_bar
from .options import DeviceOpt, JsonOpt, OnlineOpt, WorkspaceOpt


@command
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to make the workspace in.")] = Path("."),
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML to start from.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing vepatch.yaml.")] = False,
    as_json: JsonOpt = False,
):
    """Make a workspace: vepatch.yaml (the recipe) and .vepatch/ (the store).

    Example: vepatch init ws --recipe recipes/textile.yaml
    """
    from ..recipe import Recipe, load_recipe
    from ..workspace import init_workspace

    chosen = load_recipe(recipe) if recipe else Recipe()
    ws = init_workspace(directory, chosen, force=force)
    if as_json:
        emit_json({"workspace": str(ws.root), "recipe": str(recipe or "defaults")})
    else:
        out.print(f"workspace ready: {ws.root} (recipe: {recipe or 'defaults'}, model: {chosen.model.ref})")


@command(name="eval", sharded=True)
def eval_(
    data: Annotated[Path, typer.Argument(help="Labelled set: <class>/ image folders or a saved `datasets` folder; "
                                              "or images with same-named .txt captions (retrieval; a recipe's "
                                              "captioning suite: caption likelihood).")],
    version: Annotated[Optional[str], typer.Option("--version", help="base, vN, or a candidate id (default: current).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model reference outside a workspace (default: 'default').")] = None,
    template: Annotated[Optional[list[str]], typer.Option("--template", help="Prompt template ('{}' = class); repeatable.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass.")] = None,
    confusion: Annotated[bool, typer.Option("--confusion", help="Also print the confusion matrix.")] = False,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    online: OnlineOpt = False,
    as_json: JsonOpt = False,
):
    """Accuracy, per-class recall and confusion matrix of a model version on a labelled set;
    on a retrieval set (images with same-named .txt captions), Recall@1/5 both ways; on a
    captioning suite of the recipe, the mean likelihood of its captions (CoCa models).

    Example: vepatch eval ../shared/data/imagenette-guard --json
    """
    from .. import context
    from ..evaluate import captioning_set, evaluate_captioning, evaluate_retrieval, evaluate_set, retrieval_set
    from .render import captioning_table, confusion_table, eval_table, retrieval_table

    ctx = context.open_context(workspace, model=model, device=device, online=online, required=False)
    captioning = captioning_set(ctx, data)
    captioned = captioning if captioning is not None else retrieval_set(ctx, data)
    with progress_bar():
        if captioning is not None:
            result = evaluate_captioning(ctx, captioning, version=version, batch_size=batch_size)
        elif captioned is not None:
            result = evaluate_retrieval(ctx, captioned, version=version, batch_size=batch_size)
        else:
            result = evaluate_set(ctx, data, version=version, templates=template, batch_size=batch_size)
    if as_json:
        emit_json(result)
        return
    if captioning is not None:
        out.print(captioning_table(result))
    elif captioned is not None:
        out.print(retrieval_table(result))
    else:
        out.print(eval_table(result))
    if confusion and captioned is None:
        out.print(confusion_table(result, out.width))
    if result.skipped:
        err.print(f"skipped {len(result.skipped)} unreadable file(s): " + "; ".join(
            f"{s.source}: {s.reason}" for s in result.skipped[:5]) + (" ..." if len(result.skipped) > 5 else ""), markup=False)
