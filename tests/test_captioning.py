"""CoCa models: CAFe's captioning loss (apply.loss: cafe) and captioning guard suites."""

import copy
import dataclasses
import gzip
import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tiny
from vepatch import store
from vepatch.cli import app
from vepatch.recipe import ApplySpec, DataSpec, GuardSpec, GuardSuite

runner = CliRunner()

# a tiny BPE whose merges make each of these words one token (open_clip's SimpleTokenizer reads
# it from the bundle's text_cfg.tokenizer_kwargs): a vocabulary of 549 instead of 49,408 keeps
# the decoder's logits small enough to fit and run a CoCa in seconds on the CPU
WORDS = "a photo picture of red square green circle blue stripes".split()
TEMPLATES = ["a photo of a {}.", "a picture of a {}."]


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges, in rank order, under which BPE reads every word as one token."""
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            ranks = {m: i for i, m in enumerate(merges)}
            rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
            if rank == math.inf:  # no merge applies yet: add one, the lowest priority
                merges.append((pieces[0], pieces[1]))
                continue
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return merges


def coca_config(bpe_path) -> dict:
    merges = bpe_merges(WORDS)
    with gzip.open(bpe_path, "wt") as f:
        f.write("#version: tiny\n" + "\n".join(" ".join(m) for m in merges))
    vocab = 2 * 256 + len(merges) + 2  # bytes, bytes ending a word, the merges, start and end of text
    text = {"context_length": 12, "vocab_size": vocab, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
            "output_tokens": True, "tokenizer_kwargs": {"bpe_path": str(bpe_path)}}
    return {"embed_dim": 32, "custom_text": True, "text_cfg": text,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16,
                           "attentional_pool": True, "attn_pooler_queries": 8, "attn_pooler_heads": 2, "output_tokens": True},
            "multimodal_cfg": {"context_length": 12, "vocab_size": vocab, "width": 32, "heads": 2, "layers": 1,
                               "attn_pooler_heads": 2}}


def write_coca(folder, cfg: dict, state: dict) -> str:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": tiny.PREPROCESS}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    """A tiny CoCa fitted (CoCa's own loss: contrastive + captioning) to the tiny classes,
    captioned "a photo of a <class>.": its decoder reads the class from the image tokens."""
    import open_clip

    from vepatch.data import open_image_set
    from vepatch.evaluate import loader
    from vepatch.models import load_model

    folder = tmp_path_factory.mktemp("coca")
    cfg = coca_config(folder / "bpe.txt.gz")
    torch.manual_seed(0)
    model = open_clip.CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"})
    # open_clip leaves the decoder's output projection uninitialized (torch.empty): trained
    # checkpoints overwrite it, a random-init model must not read garbage
    torch.nn.init.normal_(model.text_decoder.text_projection, std=32 ** -0.5)
    loaded = load_model(write_coca(folder / "start", cfg, model.state_dict()))
    assert ((loaded.tokenizer(WORDS) != 0).sum(1) == 3).all()  # <start> word <end>: each word is one token
    train = open_image_set(tiny.make_folder(folder / "train", 16, seed=1))
    captions = loaded.tokenizer([TEMPLATES[0].format(c) for c in train.classnames])
    loss = open_clip.loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)
    m = loaded.model.train()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small: threads cost more in sync than they save (10x on a busy machine)
    try:
        for epoch in range(25):
            for x, y in loader(train, loaded.preprocess, 16, shuffle=True, seed=epoch):
                out = m(x, captions[y])
                total = sum(loss(out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]))
                opt.zero_grad()
                total.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return write_coca(folder / "fitted", cfg, m.eval().state_dict())


def _workspace(ref, tmp_path, apply=None, bar=1.0, **guard):
    """A workspace on `ref` with a classification suite (colours) and a captioning suite
    (captions), both held to `bar` pp."""
    from vepatch.recipe import ModelSpec, Recipe
    from vepatch.workspace import init_workspace

    pool = tiny.make_folder(tmp_path / "pool", 8, seed=5)
    colours = tiny.make_folder(tmp_path / "colours", 6, seed=9)
    captions = tiny.caption_folder(tiny.make_folder(tmp_path / "capsrc", 4, seed=11), tmp_path / "captions")
    suites = [GuardSuite(path=str(colours), name="colours", max_drop_pp=bar),
              GuardSuite(path=str(captions), name="captions", kind="captioning", max_drop_pp=bar)]
    recipe = Recipe(model=ModelSpec(ref=ref), classes=list(tiny.CLASSES), templates=list(TEMPLATES),
                    shot_pool=DataSpec(path=str(pool), name="pool"),
                    apply=apply or ApplySpec(method="ln", shots=4, epochs=1, batch_size=6, lr=3e-3),
                    guard=GuardSpec(**{"allow_unguarded": True, "suites": suites, "min_target_gain_pp": -100.0, "max_mean_drop_pp": 100.0,
                                       "strengths": [1.0], **guard}))
    root = tmp_path / "ws"
    init_workspace(root, recipe)
    return root, captions


def _run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if result.stdout.strip().startswith("{") else result


# --- apply.loss: cafe ---------------------------------------------------------------------


def test_cafe_adds_cocas_own_captioning_loss_to_the_step(coca):
    """The step's loss is the classification loss plus caption_weight times CoCa's own
    captioning loss (its forward's teacher forcing and CoCaLoss), read off the patched tower."""
    import open_clip

    from vepatch.captioning import caption_target
    from vepatch.losses import ce_loss
    from vepatch.methods import get
    from vepatch.methods.train import Objective, train_step
    from vepatch.models import load_model
    from vepatch.models.heads import text_head
    from vepatch.models.towers import describe_tower
    from vepatch.runtime.passes import autocast

    loaded = load_model(coca)
    model = loaded.model
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 2, 1, 0])
    head = text_head(loaded, tiny.CLASSES, TEMPLATES[:1])
    scale = model.logit_scale.exp().detach()
    objective = Objective(head, scale, captions=caption_target(loaded, tiny.CLASSES, TEMPLATES[:1]))
    with torch.no_grad():
        expected_ce = ce_loss(model.encode_image(images), head, scale, labels)
        out = model(images, loaded.tokenizer([TEMPLATES[0].format(tiny.CLASSES[k]) for k in labels]))
        _, expected_caption = open_clip.loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=model.pad_id)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
    assert float(expected_caption) > 0.01
    for weight in (0.0, 0.5, 2.0):
        spec = ApplySpec(method="full", loss="cafe", caption_weight=weight, lr=1e-3)
        trainable = get("full").build(copy.deepcopy(model.visual), describe_tower(model), None, spec)
        loss = train_step(trainable, torch.optim.Adam(trainable.params, lr=1e-3), images, labels, objective, spec,
                          autocast("cpu"), torch.Generator().manual_seed(0))
        assert float(loss) == pytest.approx(float(expected_ce) + weight * float(expected_caption), rel=1e-4)
    assert all(p.grad is None for p in model.text_decoder.parameters())  # frozen: the decoder takes no gradient


def test_every_vision_method_trains_a_coca_with_cafe(coca):
    from vepatch.captioning import caption_target
    from vepatch.masks import build_masks
    from vepatch.methods import REGISTRY
    from vepatch.methods.train import Objective, train_step
    from vepatch.models import load_model
    from vepatch.models.heads import text_head
    from vepatch.models.towers import describe_tower
    from vepatch.recipe import DiagnoseSpec
    from vepatch.runtime.passes import autocast

    loaded = load_model(coca)
    tower = describe_tower(loaded.model)
    objective = Objective(text_head(loaded, tiny.CLASSES, TEMPLATES), loaded.model.logit_scale.exp().detach(),
                          captions=caption_target(loaded, tiny.CLASSES, TEMPLATES))
    params = dict(loaded.model.named_parameters())
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    vision = [m for m in REGISTRY.values() if m.side == "vision"]
    assert {"lorsu", "lora", "ln", "full"} <= {m.name for m in vision}
    for method in vision:
        masks = None
        if method.needs_masks:  # LoRSU's budget at random places: the shapes every method gets
            grads = {n: torch.randn(params[n].shape) for n in tower.fc1 + tower.qkv}
            masks = build_masks(grads, tower, DiagnoseSpec().fc1_fraction, DiagnoseSpec().heads_per_layer, "random")
        spec = ApplySpec(method=method.name, loss="cafe", lr=1e-2, rank=2, lora_alpha=2.0)
        torch.manual_seed(0)
        trainable = method.build(copy.deepcopy(loaded.model.visual), tower, masks, spec)
        optimizer = torch.optim.Adam(trainable.params, lr=1e-2)
        for _ in range(2):
            loss = train_step(trainable, optimizer, images, labels, objective, spec, autocast("cpu"), torch.Generator())
            assert math.isfinite(float(loss)), method.name
        delta = trainable.delta()
        assert delta.params and all(p.startswith("visual.") for p in delta.params), method.name
        assert any(float(t.abs().max()) > 0 for k, t in delta.tensors.items() if not k.endswith("index")), method.name


def test_apply_with_cafe_writes_a_vision_only_candidate_the_caption_weight_shapes(coca, tmp_path):
    from vepatch.apply import run_apply
    from vepatch.context import open_context
    from vepatch.delta import apply_delta
    from vepatch.models import load_model
    from vepatch.recipe import with_overrides

    spec = ApplySpec(method="lorsu", shots=4, epochs=2, batch_size=6, lr=3e-3, rank=2, lora_alpha=2.0)
    root, _ = _workspace(coca, tmp_path, apply=spec)
    ctx = open_context(root)
    before = {k: v.clone() for k, v in ctx.model()[0].model.state_dict().items()}
    patches = {}
    for loss, weight in (("ce", 1.0), ("cafe", 0.0), ("cafe", 1.0), ("cafe", 4.0)):
        recipe = with_overrides(ctx.recipe, {"apply.loss": loss, "apply.caption_weight": weight})
        manifest = run_apply(ctx, recipe, diagnosis="none")
        assert math.isfinite(manifest.metrics.final_loss)
        _, delta = store.read_candidate(ctx.workspace, manifest.candidate_id)
        assert all(p.startswith("visual.") for p in delta.params)
        patches[(loss, weight)] = delta.to_bytes()
    # the captioning term is in the step: weight 0 is plain cross-entropy to the byte, any other weight is not
    assert patches[("cafe", 0.0)] == patches[("ce", 1.0)]
    assert len({patches[("ce", 1.0)], patches[("cafe", 1.0)], patches[("cafe", 4.0)]}) == 3
    # the text tower and the decoder are untouched (the training copy alone moved) and took no gradient
    after = ctx.model()[0].model
    for name, value in after.state_dict().items():
        if name.startswith(("text.", "text_decoder.")):
            assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in after.text_decoder.parameters())
    fresh = load_model(coca)
    apply_delta(fresh.model, store.read_candidate(ctx.workspace, manifest.candidate_id)[1])
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items() if not k.startswith("visual."))


def test_cafe_needs_a_coca_and_a_vision_method(vit_bundle, coca, tmp_path):
    root, _ = _workspace(f"local-dir:{vit_bundle}", tmp_path, suites=[])
    result = _run("apply", "-C", root, "--loss", "cafe", "--diagnosis", "none", code=2)
    assert "apply.loss: cafe needs an open_clip CoCa" in result.output and "is a CLIP" in result.output
    assert "fix: use apply.loss: ce" in result.output
    assert not list((root / ".vepatch" / "candidates").glob("*"))  # refused before anything trained
    shutil.rmtree(root)
    root, _ = _workspace(coca, tmp_path / "coca", suites=[])
    result = _run("apply", "-C", root, "--loss", "cafe", "--method", "coop", "--diagnosis", "none", code=2)
    assert "--method coop learns prompts" in result.output


def test_a_coca_goes_through_diagnose_apply_guard_eval_and_export(coca, tmp_path):
    """The whole loop on a CoCa, as on any ViT: its tower returns (pooled, tokens) and every
    step reads the part it needs."""
    from vepatch.captioning import mean_likelihood
    from vepatch.models import load_model
    from vepatch.models.towers import describe_tower
    from vepatch.retrieval import open_caption_set
    from vepatch.workspace import Workspace

    # lorsu-fc1 changes blocks only: the guard keeps each suite's activations at the first one it touches
    spec = ApplySpec(method="lorsu-fc1", shots=4, epochs=1, batch_size=6, lr=3e-3, loss="cafe")
    root, captions = _workspace(coca, tmp_path, apply=spec, bar=100.0)
    errors = tiny.make_folder(tmp_path / "errors", 3, seed=3)
    (errors / "red_square").rename(errors / "swap")  # mislabelled: the model reads them as what they show
    (errors / "green_circle").rename(errors / "red_square")
    (errors / "swap").rename(errors / "green_circle")
    diagnosis = _run("diagnose", errors, "-C", root, "--json")["diagnosis"]
    assert diagnosis["n_errors"] >= 3 and diagnosis["selected_params"] > 0
    manifest = _run("apply", "-C", root, "--json")
    assert manifest["diagnosis"] and manifest["recipe"]["apply"]["loss"] == "cafe"
    delta = store.read_candidate(Workspace(root), manifest["candidate_id"])[1]
    assert describe_tower(load_model(coca).model).entry_for(delta.params).startswith("visual.transformer.resblocks.")
    report = _run("guard", "-C", root, "--json")
    assert report["version"] == "v1" and "captions caption lik." in {s["name"] for s in report["trials"][0]["suites"]}
    assert _run("eval", tmp_path / "colours", "-C", root, "--json")["n"] == 18
    likelihood = _run("eval", captions, "-C", root, "--json")["likelihood"]
    # the guard read the suite from the first block the patch touches (kept activations): a plain pass agrees
    row = {s["name"]: s for s in report["trials"][0]["suites"]}["captions caption lik."]
    assert row["before"] == pytest.approx(_run("eval", captions, "-C", root, "--version", "base", "--json")["likelihood"], abs=1e-9)
    assert row["after"] == pytest.approx(likelihood, abs=1e-6) and row["after"] != row["before"]
    _run("export", "v1", "--out", tmp_path / "exported", "-C", root, "--json")
    exported = load_model(f"local-dir:{tmp_path / 'exported'}")
    assert exported.fingerprint == manifest["fingerprint"]
    assert mean_likelihood(exported, open_caption_set(captions, "captions", "captioning"), 8, "cpu") == pytest.approx(likelihood)


# --- captioning guard suites ----------------------------------------------------------------


def _plant(ws, manifest: dict, name: str, delta) -> str:
    """A candidate of the same parent and holdout as `manifest`'s, carrying `delta`."""
    from vepatch.delta import patched_fingerprint, sha256_bytes
    from vepatch.models import load_model
    from vepatch.records import PatchManifest, from_json

    m = from_json(PatchManifest, json.dumps(manifest))
    data = delta.to_bytes()
    parent = load_model(m.recipe.model.ref)
    planted = dataclasses.replace(m, candidate_id=f"{m.candidate_id}-{name}", patch_sha256=sha256_bytes(data),
                                  patch_bytes=len(data), fingerprint=patched_fingerprint(parent.model, delta))
    store.write_candidate(ws, planted, data)
    return planted.candidate_id


def _sign_flip(model, seed: int = 0):
    """Flip the sign of half of ln_post's outputs and undo it in `proj`: the pooled features
    (all any class head reads) stay bit-identical, the image tokens the decoder reads do not."""
    from vepatch.delta import Delta

    visual = model.visual
    flip = torch.ones(visual.ln_post.weight.shape[0])
    flip[torch.randperm(len(flip), generator=torch.Generator().manual_seed(seed))[: len(flip) // 2]] = -1.0
    delta = Delta()
    delta.add_dense("visual.ln_post.weight", visual.ln_post.weight.detach() * (flip - 1))
    delta.add_dense("visual.ln_post.bias", visual.ln_post.bias.detach() * (flip - 1))
    delta.add_dense("visual.proj", visual.proj.detach() * (flip[:, None] - 1))
    return delta


def test_a_captioning_suite_refuses_a_patch_that_only_hurts_captions(coca, tmp_path):
    from vepatch import evidence
    from vepatch._typed import to_plain
    from vepatch.delta import Delta, apply_delta
    from vepatch.models import load_model
    from vepatch.records import GuardReport, read_record
    from vepatch.workspace import Workspace

    root, captions = _workspace(coca, tmp_path)
    base = _run("eval", captions, "-C", root, "--json")
    assert base["images"] == 12 and base["captions"] == 3 and base["likelihood"] > 0.5
    manifest = _run("apply", "-C", root, "--diagnosis", "none", "--json")
    ws = Workspace(root)
    model = load_model(coca).model
    images = torch.randn(4, 3, 32, 32)
    scrambled = _sign_flip(model)
    pooled, tokens = model.visual(images)
    apply_delta(model, scrambled)
    assert torch.equal(model.visual(images)[0], pooled) and not torch.allclose(model.visual(images)[1], tokens)

    planted = _plant(ws, manifest, "flip", scrambled)
    shown = runner.invoke(app, ["guard", planted, "-C", str(root)], env={"COLUMNS": "80"})
    assert shown.exit_code == 3, shown.output
    assert max(len(line) for line in shown.output.splitlines()) <= 80, shown.output
    assert any(line.strip().startswith("captions caption") and line.rstrip().endswith("FAIL") for line in shown.output.splitlines()), shown.output
    refused = to_plain(read_record(GuardReport, ws.candidate_dir(planted) / store.GUARD_FILE))
    rows = {s["name"]: s for s in refused["trials"][0]["suites"]}
    assert rows["colours"]["change_pp"] == 0.0 and rows["colours"]["passed"]  # the class heads see nothing
    row = rows["captions caption lik."]
    assert row["before"] == pytest.approx(base["likelihood"])
    assert not row["passed"] and row["change_pp"] < -1.0 and row["bound_pp"] < row["change_pp"], row
    assert f"could be as bad as {row['bound_pp']:+.1f} pp" in row["why"] and "shown beyond the bar" in row["why"]
    assert not refused["accepted"] and "captions caption lik.: uncertified" in refused["reason"]
    assert store.versions(ws) == [] and store.head(ws) == "base"

    # what the verdict keeps: each image's likelihood before and after, and the page shows them
    proof = evidence.read(ws.candidate_dir(refused["candidate_id"]) / store.EVIDENCE_FILE)
    kept = next(s for s in proof.suites if s.name == "captions caption lik.")
    assert kept.scores and len(kept.before) == 12 and ((0 < kept.after) & (kept.after <= 1)).all()
    assert np.mean(kept.after) == pytest.approx(row["after"], abs=1e-6) and len(kept.broke) >= 10
    page = _run("report", refused["candidate_id"], "-C", root, "--out", tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert page.exit_code == 0 and "less likely captions" in html and "a photo of a red square." in html

    # a patch that leaves the image tokens alone (the projection only feeds the pooled features) passes
    kept_captions = Delta()
    kept_captions.add_dense("visual.proj", 0.01 * load_model(coca).model.visual.proj.detach())
    accepted = _run("guard", _plant(ws, manifest, "proj", kept_captions), "-C", root, "--json")
    row = {s["name"]: s for s in accepted["trials"][0]["suites"]}["captions caption lik."]
    assert accepted["accepted"] and row["change_pp"] == 0.0 and row["passed"] and row["bound_pp"] == 0.0
    assert row["why"].startswith("uncertified: 12 images")  # too few to certify, and no drop to show
    after = _run("eval", captions, "-C", root, "--json")
    assert after["version"] == "v1" and after["likelihood"] == pytest.approx(base["likelihood"])


def test_a_captioning_suite_needs_a_model_with_a_decoder(vit_bundle, tmp_path):
    from vepatch.workspace import Workspace

    root, captions = _workspace(f"local-dir:{vit_bundle}", tmp_path)
    result = _run("eval", captions, "-C", root, code=2)
    assert "guard suite 'captions' (kind: captioning) needs an open_clip CoCa" in result.output
    assert "make it `kind: retrieval`" in result.output
    _run("apply", "-C", root, "--diagnosis", "none", "--json")
    result = _run("guard", "-C", root, code=2)
    assert "guard suite 'captions' (kind: captioning) needs an open_clip CoCa" in result.output
    assert store.versions(Workspace(root)) == []


def test_a_saved_dataset_is_the_same_captioning_suite(coca, tmp_path):
    """The retrieval suites' reader: a folder of captioned images or a saved dataset with an
    image and a text column give the same likelihoods; one caption is enough to caption."""
    import datasets
    from PIL import Image

    from vepatch.captioning import mean_likelihood, scores
    from vepatch.errors import DataError
    from vepatch.models import load_model
    from vepatch.retrieval import open_caption_set
    from vepatch.runtime.passes import SuiteInputs

    folder = tiny.caption_folder(tiny.make_folder(tmp_path / "src", 2, seed=4), tmp_path / "caps")
    files = sorted(folder.glob("*.png"))
    rows = {"image": [Image.open(f).convert("RGB") for f in files],
            "caption": [f.with_suffix(".txt").read_text().strip() for f in files]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
                               ).save_to_disk(str(tmp_path / "saved"))
    loaded = load_model(coca)
    from_folder = open_caption_set(folder, "caps", "captioning")
    from_saved = open_caption_set(tmp_path / "saved", "caps", "captioning")
    a = scores(loaded, SuiteInputs(from_folder, loaded.preprocess, 4), "cpu")
    b = scores(loaded, SuiteInputs(from_saved, loaded.preprocess, 4), "cpu")
    assert len(a.values) == 6 and np.allclose(a.values, b.values) and ((0 < a.values) & (a.values <= 1)).all()
    one = tmp_path / "one"
    one.mkdir()
    for f in files[:2]:
        shutil.copy(f, one / f.name)
        (one / f.with_suffix(".txt").name).write_text("a photo of a blue stripes.")
    assert 0 < mean_likelihood(loaded, open_caption_set(one, "one", "captioning"), 4, "cpu") <= 1
    with pytest.raises(DataError, match="at least two different captions"):
        open_caption_set(one)


def test_caption_likelihoods_are_judged_by_the_bound_of_their_mean_change():
    """A captioning row's paired per-image values: a seeded bootstrap bounds the mean drop; the
    row passes when the bound is within the bar. Fewer than CAPTION_FLOOR images leave it
    uncertified (lenient: it refuses only a drop shown beyond the bar)."""
    from vepatch.captioning import row_name
    from vepatch.data import ImageSet, Sample
    from vepatch.guard import Suite, judge
    from vepatch.runtime.passes import Scores

    def verdict(before, after, small_suites="lenient"):
        n = len(before)
        images = ImageSet("caps", "/nowhere", ["a caption"], [Sample(f"/nowhere/{i}.png", 0) for i in range(n)])
        suite = Suite(row_name("caps"), "guard", images, torch.zeros(0), 1.0, group="caps", caption=True)
        labels = np.zeros(n, dtype=np.int64)
        spec = GuardSpec(min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, small_suites=small_suites, strengths=[1.0],
                         allow_unguarded=True)
        return judge([suite], {suite.name: Scores(labels, np.array(before))}, {suite.name: Scores(labels, np.array(after))},
                     spec, 1.0).suites[0]

    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, 60)
    down = verdict(base, base - 0.03)  # every image 3 pp lower
    assert not down.passed and down.bound_pp == pytest.approx(-3.0) and "could be as bad as" in down.why
    noise = verdict(base, base + rng.normal(0, 0.01, 60))  # no drop, 1 pp noise per image
    assert noise.passed and noise.certified and -1.0 < noise.bound_pp
    assert verdict(base, base - 0.002).bound_pp == verdict(base, base - 0.002).bound_pp  # seeded: same data, same bound
    few = verdict([0.9] * 4, [0.895] * 4)  # 4 images: uncertified, the drop not shown beyond 1 pp
    assert few.passed and not few.certified and "uncertified" in few.why
    assert not verdict([0.9] * 4, [0.895] * 4, "strict").passed
    assert not verdict([0.9] * 4, [0.85] * 4).passed  # -5 pp on every image: shown beyond the bar
