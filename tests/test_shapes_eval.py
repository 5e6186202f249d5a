"""The shapes prior (as an ordinary diffusers pipeline), its resumable trainer, the shapes classifier,
the ground-truth metrics and the ``eval`` / ``prior eval`` commands.

References are computed independently in the tests: the UNet and text encoder are reloaded with
diffusers / transformers ``from_pretrained`` and called directly, captions are built with
``view_prompt``, and ground-truth metrics are checked on renders whose answer is known by construction
(the ground truth itself, a wrong shape, a wrong color, a mirrored or two-handled mug).

Rendering the 16 evaluation views at 64x64 costs up to a second per shape on a CPU, so each
ground-truth render is done once (module fixtures).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from threedistill import priors as priors_mod
from threedistill.cameras import VIEW_LABELS as CAMERA_VIEW_LABELS
from threedistill.cli import main
from threedistill.config import CameraConfig, PriorConfig
from threedistill.errors import MissingWeightsError, UserError
from threedistill.priors import DiffusersPrior, load_prior
from threedistill.priors.base import view_prompt
from threedistill.representations.base import Representation, RenderOutput
from threedistill.shapes import prior as prior_mod
from threedistill.shapes.evaluate import (EVAL_AZIMUTHS, EVAL_ELEVATIONS, eval_cameras, evaluate_representation,
                                          score_images, view_consistency)
from threedistill.shapes.prior import (ASSETS_DIR, SHIPPED_PRIOR, PriorTrainConfig, PriorTrainer, build_models,
                                       caption_table, min_snr_weights, render_views, save_pipeline)
from threedistill.shapes.render import render_mesh, render_shape
from threedistill.shapes.world import (BACKGROUND, COLOR_NAMES, COLORS, SHAPES, ShapePrompt, all_prompts,
                                       mirrored_mug, parse_prompt)

CPU = torch.device("cpu")
CLASSIFIER_PATH = ASSETS_DIR / "shapes-classifier.safetensors"


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """One intra-op thread: on a CPU shared with another job, multi-threaded convolutions and the
    renderer's big batched ops spend most of their time waiting for each other (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# 1. The prior pipeline through the generic loader
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_pipeline(tmp_path_factory):
    unet, text_encoder, tokenizer, scheduler = build_models(seed=3)
    out = save_pipeline(tmp_path_factory.mktemp("shapes-prior") / "pipe", unet, text_encoder, tokenizer, scheduler)
    return out


def test_saved_pipeline_loads_as_pixel_prior_and_predicts_like_the_raw_unet(shapes_pipeline):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = json.loads((shapes_pipeline / "model_index.json").read_text())
    assert "vae" not in index
    for component in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (shapes_pipeline / component).is_dir(), component

    prior = load_prior(PriorConfig(name=str(shapes_pipeline)), CPU)
    assert isinstance(prior, DiffusersPrior)
    assert prior.is_latent is False and prior.vae is None
    assert prior.image_resolution == 64
    assert prior.learned_variance is False
    assert prior.prediction_type == "v_prediction"
    assert prior.model_space_shape(1) == (1, 3, 64, 64)
    assert prior.dtype == torch.float32 and prior.device == CPU
    # DiffusersPrior(path) directly gives the same kind of prior.
    direct = DiffusersPrior(shapes_pipeline, CPU)
    assert direct.is_latent is False and direct.image_resolution == 64 and direct.learned_variance is False

    emb, mask = prior.encode_text(["a red cube", "a red cube, front view", ""])
    assert mask is None  # CLIP: no attention mask
    assert emb.shape == (3, 16, 64) and torch.isfinite(emb).all()
    assert not torch.equal(emb[0], emb[1])

    # Independent computation: components reloaded with from_pretrained and called directly.
    tok = CLIPTokenizer.from_pretrained(shapes_pipeline / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(shapes_pipeline / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(shapes_pipeline / "unet").eval()
    ids = tok(["a red cube"], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 3, 64, 64, generator=g)
    t = torch.tensor([417])
    with torch.no_grad():
        text_ref = text_encoder(ids)[0]
        v = unet(x_t, t, encoder_hidden_states=text_ref).sample
    # The UNet predicts v = sqrt(abar) eps - sqrt(1 - abar) x0; with x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    # that gives eps = sqrt(abar) v + sqrt(1 - abar) x_t (abar read from the saved scheduler).
    from diffusers import DDPMScheduler

    abar = DDPMScheduler.from_pretrained(shapes_pipeline / "scheduler").alphas_cumprod[417]
    eps_ref = abar.sqrt() * v + (1 - abar).sqrt() * x_t
    torch.testing.assert_close(emb[0:1], text_ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        eps = prior.predict_noise(x_t, t, emb[0:1])
    assert eps.shape == (1, 3, 64, 64) and eps.dtype == torch.float32
    torch.testing.assert_close(eps, eps_ref, rtol=0, atol=1e-6)
    assert eps.abs().mean() > 0  # a real prediction, not zeros


def test_tokenizer_has_one_token_per_shapes_word(shapes_pipeline):
    from transformers import CLIPTokenizer

    prior = DiffusersPrior(shapes_pipeline, CPU)
    reloaded = CLIPTokenizer.from_pretrained(shapes_pipeline / "tokenizer")
    expected = ["a</w>", "red</w>", "cube</w>", ",</w>", "front</w>", "view</w>"]
    for tok in (prior.tokenizer, reloaded):
        assert tok.tokenize("a red cube, front view") == expected
        ids = tok("a red cube, front view").input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == len(expected) + 2
        # Every shape, color and view word is one token too, except "torus" (BPE splits it; see prior.py).
        for word in SHAPES + COLOR_NAMES + tuple(CAMERA_VIEW_LABELS) + ("an",):
            if word != "torus":
                assert tok.tokenize(word) == [word + "</w>"], word
    assert prior.max_text_tokens == 16
    # The longest shapes-world prompt fits in the 16-token budget without truncation.
    longest = max((view_prompt(p.text, v) for p in all_prompts() for v in CAMERA_VIEW_LABELS), key=len)
    assert len(prior.tokenizer(longest).input_ids) <= 16


# ----------------------------------------------------------------------------------------------
# 2. The built-in name "shapes"
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (SHIPPED_PRIOR / "model_index.json").is_file(),
                    reason=f"the shipped shapes prior is not in this checkout ({SHIPPED_PRIOR}/model_index.json missing)")
def test_builtin_shapes_name_loads_the_shipped_folder():
    prior = load_prior(PriorConfig(name="shapes"), CPU)
    assert isinstance(prior, DiffusersPrior)
    assert prior.is_latent is False and prior.image_resolution == 64 and prior.learned_variance is False
    emb, _ = prior.encode_text(["a red cube, front view"])
    assert emb.shape[0] == 1 and torch.isfinite(emb).all()
    assert prior.tokenizer.tokenize("a red cube") == ["a</w>", "red</w>", "cube</w>"]


def test_builtin_shapes_name_without_the_folder_raises_missing_weights(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-prior"
    monkeypatch.setattr(priors_mod, "SHIPPED_PRIOR", missing)
    with pytest.raises(MissingWeightsError) as info:
        load_prior(PriorConfig(name="shapes"), CPU)
    message = str(info.value)
    assert str(missing) in message
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------
# 3. The trainer: resuming gives the same weights as an uninterrupted run
# ----------------------------------------------------------------------------------------------
TINY_PROMPTS = [ShapePrompt("cube", "red"), ShapePrompt("cube", "blue")]


def _tiny_cfg(steps):
    return PriorTrainConfig(steps=steps, batch_size=2, images_per_prompt=1, checkpoint_every=1, warmup_steps=1)


def _pipeline_weights(folder):
    return (load_file(str(folder / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")),
            load_file(str(folder / "pipeline" / "text_encoder" / "model.safetensors")))


def test_trainer_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(prior_mod, "training_prompts", lambda: list(TINY_PROMPTS))
    quiet = lambda msg: None  # noqa: E731

    full = tmp_path / "full"
    PriorTrainer(full, _tiny_cfg(2)).train(log=quiet)

    part = tmp_path / "part"
    out = PriorTrainer(part, _tiny_cfg(1)).train(log=quiet)
    assert out == part / "pipeline"
    assert json.loads((part / "pipeline" / "training.json").read_text())["steps"] == 1
    unet1, _ = _pipeline_weights(part)
    live1 = torch.load(part / "state.pt")["unet"]
    messages = []
    PriorTrainer(part, _tiny_cfg(2)).train(log=messages.append)
    assert any("resuming at step 1" in m for m in messages), messages

    (unet_a, te_a), (unet_b, te_b) = _pipeline_weights(full), _pipeline_weights(part)
    assert unet_a.keys() == unet_b.keys() and te_a.keys() == te_b.keys()
    for k in unet_a:
        assert torch.equal(unet_a[k], unet_b[k]), k
    for k in te_a:
        assert torch.equal(te_a[k], te_b[k]), k

    for folder in (full, part):
        meta = json.loads((folder / "pipeline" / "training.json").read_text())
        assert meta["steps"] == 2 and meta["train_config"]["steps"] == 2
        assert [json.loads(l)["step"] for l in (folder / "log.jsonl").read_text().splitlines()] == [1, 2]
        assert not (folder / ".pipeline.tmp").exists() and not (folder / ".pipeline.old").exists()
    state = torch.load(part / "state.pt")
    assert state["step"] == 2

    # The exported weights are an exponential moving average: step 2 moved them from the step-1 EMA
    # towards the step-2 live weights by one common factor k in (0, 1) (not the live weights themselves).
    live2 = state["unet"]
    num = sum(((unet_b[k] - unet1[k]) * (live2[k] - unet1[k])).sum() for k in unet_b)
    den = sum(((live2[k] - unet1[k]) ** 2).sum() for k in unet_b)
    k_ema = float(num / den)
    assert 0.0 < k_ema < 1.0
    for k in unet_b:
        torch.testing.assert_close(unet_b[k], unet1[k] + k_ema * (live2[k] - unet1[k]), rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(unet_b[k], live2[k]) for k in unet_b)
    assert any(not torch.equal(live1[k], live2[k]) for k in live1)  # the second step trained

    # The exported pipeline loads through the generic loader.
    prior = DiffusersPrior(part / "pipeline", CPU)
    assert prior.is_latent is False and prior.image_resolution == 64

    # The dataset: 2 prompts x 1 image, uint8, white background in the corners, the object in color.
    data = torch.load(part / "dataset.pt")
    images = data["images"]
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64)
    assert data["prompts"] == [p.text for p in TINY_PROMPTS]
    assert data["prompt_index"].tolist() == [0, 1]
    assert all(0 <= v < 4 for v in data["view_index"].tolist())
    white = torch.tensor([round(255 * c) for c in BACKGROUND], dtype=torch.uint8)
    for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert (images[:, :, r, c] == white).all()
    for img, p in zip(images.int(), TINY_PROMPTS):
        fg = (img != 255).any(0)
        assert fg.sum() > 100
        dominant = COLORS[p.color].index(max(COLORS[p.color]))  # red -> R, blue -> B
        mean = img[:, fg].float().mean(1)
        assert mean.argmax().item() == dominant, (p.text, mean)


def test_min_snr_weights_closed_form():
    # SNR = abar / (1 - abar): abar 0.5 -> SNR 1 (weight 1), abar 0.9 -> SNR 9 (weight 5/9 at gamma 5),
    # abar 5/6 -> SNR exactly 5 (weight 1); gamma 0 switches the weighting off.
    abar = torch.tensor([0.5, 0.9, 5.0 / 6.0, 0.01])
    assert torch.allclose(min_snr_weights(abar, 5.0), torch.tensor([1.0, 5.0 / 9.0, 1.0, 1.0]), atol=1e-6)
    assert torch.equal(min_snr_weights(abar, 0.0), torch.ones(4))
    # v-prediction divides by SNR + 1: abar 0.5 -> 1/2, abar 0.9 -> 5/10, abar 0.01 -> SNR/(SNR+1) = 0.01.
    assert torch.allclose(min_snr_weights(abar, 5.0, v_prediction=True),
                          torch.tensor([0.5, 0.5, 5.0 / 6.0, 0.01]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 4. Captions
# ----------------------------------------------------------------------------------------------
def test_caption_table_layout():
    prompts = ["a red cube", "a blue sphere", "an orange torus"]
    table = caption_table(prompts)
    assert table[0] == ""
    assert len(table) == 1 + len(prompts) * 5
    for i, p in enumerate(prompts):
        block = table[1 + 5 * i: 1 + 5 * (i + 1)]
        assert block == [p] + [view_prompt(p, v) for v in ("front", "side", "back", "overhead")]
        assert block[1] == f"{p}, front view"
    assert caption_table([]) == [""]
    assert tuple(prior_mod.VIEW_LABELS) == tuple(CAMERA_VIEW_LABELS)


# ----------------------------------------------------------------------------------------------
# 5. Metrics on the ground truth and on known-wrong renders
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cams64():
    return eval_cameras(64)


@pytest.fixture(scope="module")
def gt64(cams64):
    """Ground truth as score_images specifies it (diffuse, headlight, ambient 0.1), rendered once."""
    cache = {}

    def get(shape, color):
        if (shape, color) not in cache:
            cache[shape, color] = render_shape(shape, color, cams64, shading="diffuse", ambient=0.1)
        return cache[shape, color]

    return get


def test_eval_cameras_layout(cams64):
    assert len(cams64) == 16 and cams64.height == cams64.width == 64
    assert sorted(set(cams64.elevation.tolist())) == sorted(EVAL_ELEVATIONS) == [5.0, 30.0]
    az = sorted({round(a % 360.0) for a in cams64.azimuth.tolist()})
    assert az == [round(a) for a in EVAL_AZIMUTHS] == list(range(0, 360, 45))
    assert torch.allclose(cams64.distance, torch.full((16,), 1.75))
    assert torch.allclose(cams64.fovy, torch.deg2rad(torch.full((16,), 55.0)))
    assert torch.allclose(cams64.light_positions, cams64.positions)  # headlight


@pytest.mark.parametrize("shape,color", [("mug", "red"), ("cube", "blue"), ("cone", "green")])
def test_ground_truth_scores_perfectly(shape, color, cams64, gt64):
    gt = gt64(shape, color)
    r = score_images(ShapePrompt(shape, color), gt.rgb, gt.mask, cams64)
    assert r["prompt"] == f"a {color} {shape}"
    assert r["iou"] == 1.0
    assert abs(r["color_error"]) <= 1e-6
    assert "prompt_correct" not in r  # no classifier given
    if shape == "mug":
        assert r["view_consistency"] == 1.0
    else:
        assert "view_consistency" not in r


def test_wrong_shape_and_wrong_color_score_worse(cams64, gt64):
    cube = gt64("cube", "red")
    as_sphere = score_images(ShapePrompt("sphere", "red"), cube.rgb, cube.mask, cams64)
    assert as_sphere["iou"] < 0.85
    assert as_sphere["color_error"] > 0.05  # sphere pixels the cube misses show background
    as_blue = score_images(ShapePrompt("cube", "blue"), cube.rgb, cube.mask, cams64)
    assert as_blue["iou"] == 1.0
    assert as_blue["color_error"] > 0.1
    # Independent value: mean |red - blue| over the blue cube's pixels, channels averaged.
    blue = gt64("cube", "blue")
    fg = blue.mask[:, 0] > 0.5
    expected = (cube.rgb - blue.rgb).abs().mean(1)[fg].mean().item()
    assert as_blue["color_error"] == pytest.approx(expected, abs=1e-6)


def test_empty_render_scores_zero_iou_and_background_color_error(cams64, gt64):
    cube = gt64("cube", "green")
    empty_rgb = torch.tensor(BACKGROUND).view(1, 3, 1, 1).expand_as(cube.rgb).clone()
    r = score_images(ShapePrompt("cube", "green"), empty_rgb, torch.zeros_like(cube.mask), cams64)
    assert r["iou"] == 0.0
    fg = cube.mask[:, 0] > 0.5
    expected = (1.0 - cube.rgb).abs().mean(1)[fg].mean().item()
    assert r["color_error"] == pytest.approx(expected, abs=1e-6)


def test_mirrored_and_two_handled_mugs_are_view_inconsistent(cams64, gt64):
    cams, mug = cams64, gt64("mug", "red")
    mirror = render_mesh(mirrored_mug(), COLORS["red"], cams, shading="diffuse", ambient=0.1)
    r = score_images(ShapePrompt("mug", "red"), mirror.rgb, mirror.mask, cams)
    assert r["view_consistency"] == 0.0
    assert r["iou"] < 1.0
    two_handled = (mug.mask > 0.5) | (mirror.mask > 0.5)
    assert view_consistency(two_handled, cams) == 0.0
    # Half the views mirrored: half the (informative) views are right.
    half = mug.mask > 0.5
    half[::2] = mirror.mask[::2] > 0.5
    assert 0.0 < view_consistency(half, cams) < 1.0


# ----------------------------------------------------------------------------------------------
# 6. The shipped classifier
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier():
    if not CLASSIFIER_PATH.is_file():
        pytest.skip(f"shipped classifier not found at {CLASSIFIER_PATH} "
                    "(train it with `threedistill prior train-classifier threedistill/assets/shapes-classifier.safetensors`)")
    from threedistill.shapes.classifier import load_classifier

    return load_classifier()


@pytest.fixture(scope="module")
def fresh_gt():
    """Fresh ground truth for all 36 prompts from a seed training never used: two sampler views (random
    cameras, lights and shading) and two evaluation views (diffuse, headlight, one per elevation) per
    prompt, as uint8 like the training data. (``classifier_accuracy(seed=...)`` renders 20 views per
    prompt at least, several times the cost.)"""
    g = torch.Generator().manual_seed(4242)
    cams = eval_cameras(64)
    # Evaluation azimuths other than +-90 degrees: from there the mug's handle is hidden behind the body
    # or seen edge-on in front of it, so no classifier can tell a mug from a cylinder in that one image.
    azimuths = [k for k, a in enumerate(EVAL_AZIMUTHS) if a not in (90.0, 270.0)]
    images, s_idx, c_idx = [], [], []
    for i, p in enumerate(all_prompts()):
        imgs, _ = render_views(p, 2, g, albedo_prob=0.3)
        views = [azimuths[i % 6], 8 + azimuths[(i + 3) % 6]]  # elevation 5 and elevation 30
        imgs = torch.cat([imgs, render_shape(p.shape, p.color, cams[views]).rgb])
        images.append((imgs * 255).round().to(torch.uint8))
        s_idx += [SHAPES.index(p.shape)] * len(imgs)
        c_idx += [COLOR_NAMES.index(p.color)] * len(imgs)
    return torch.cat(images), torch.tensor(s_idx), torch.tensor(c_idx)


def test_classifier_reads_fresh_ground_truth(classifier, fresh_gt, monkeypatch):
    from threedistill.shapes import classifier as classifier_mod

    images, s_idx, c_idx = fresh_gt
    with torch.no_grad():
        ls, lc = classifier(images.float() / 255.0)
    shape_acc = (ls.argmax(-1) == s_idx).float().mean().item()
    color_acc = (lc.argmax(-1) == c_idx).float().mean().item()
    assert shape_acc >= 0.95, shape_acc
    assert color_acc >= 0.95, color_acc
    # classifier_accuracy computes the same numbers from the same data.
    seen = {}

    def fake_data(images_per_prompt, seed):
        seen.update(n=images_per_prompt, seed=seed)
        return fresh_gt

    monkeypatch.setattr(classifier_mod, "make_classifier_data", fake_data)
    acc = classifier_mod.classifier_accuracy(classifier, seed=4242, images_per_prompt=4)
    assert seen == {"n": 4, "seed": 4242}
    assert acc["shape"] == pytest.approx(shape_acc) and acc["color"] == pytest.approx(color_acc)
    assert acc["images"] == len(images) == 36 * 4
    assert acc["both"] <= min(acc["shape"], acc["color"])


def test_score_images_with_classifier(classifier, cams64, gt64):
    red = gt64("cube", "red")
    r = score_images(ShapePrompt("cube", "red"), red.rgb, red.mask, cams64, classifier=classifier)
    assert r["predicted"] == "a red cube"
    assert (r["prompt_correct"], r["shape_correct"], r["color_correct"]) == (1.0, 1.0, 1.0)
    blue = gt64("cube", "blue")
    r = score_images(ShapePrompt("cube", "red"), blue.rgb, blue.mask, cams64, classifier=classifier)
    assert r["predicted"] == "a blue cube"
    assert (r["prompt_correct"], r["shape_correct"], r["color_correct"]) == (0.0, 1.0, 0.0)
    mug = gt64("mug", "red")
    r = score_images(ShapePrompt("mug", "red"), mug.rgb, mug.mask, cams64, classifier=classifier)
    assert r["prompt_correct"] == 1.0


# ----------------------------------------------------------------------------------------------
# 7. evaluate_representation on a representation that renders the ground truth
# ----------------------------------------------------------------------------------------------
class GroundTruthRep(Representation):
    """Renders the exact ground truth of one prompt (diffuse, the cameras' own light)."""

    def __init__(self, shape, color, ambient_light=0.1):
        super().__init__()
        self.shape, self.color, self.ambient_light = shape, color, ambient_light
        self.calls = []

    def evaluation_ambient(self):
        return self.ambient_light

    def render(self, cameras, step=0, generator=None, training=True):
        self.calls.append((cameras, training))
        gt = render_shape(self.shape, self.color, cameras, shading="diffuse", ambient=self.ambient_light)
        return RenderOutput(rgb=gt.rgb, alpha=gt.mask, depth=torch.zeros_like(gt.mask))

    def regularizers(self, out, step):
        return {}

    def param_groups(self, optim_cfg):
        return []


class RecordingClassifier:
    """Stands in for the shipped classifier: records its input and names a fixed prediction."""

    def __init__(self, shape, color):
        self.shape, self.color, self.images = shape, color, None

    def predict(self, images):
        self.images = images
        n = images.shape[0]
        return {"shapes": [self.shape] * n, "colors": [self.color] * n, "shape": self.shape, "color": self.color}


def test_evaluate_representation_of_ground_truth(cams64, gt64):
    rep = GroundTruthRep("cube", "blue")
    clf = RecordingClassifier("cube", "blue")
    r = evaluate_representation(rep, "a blue cube, front view", camera_cfg=CameraConfig(), classifier=clf)
    assert r["iou"] == 1.0 and abs(r["color_error"]) <= 1e-6
    assert r["prompt"] == "a blue cube" and r["predicted"] == "a blue cube" and r["prompt_correct"] == 1.0
    (cams, training), = rep.calls
    assert training is False
    assert len(cams) == 16 and cams.height == 64
    assert torch.allclose(cams.c2w, cams64.c2w)
    assert torch.equal(clf.images, gt64("cube", "blue").rgb)  # the classifier saw the rep's renders

    # The representation's own ambient term shades the reference: GT with ambient 0.3 scores 0 error.
    bright = GroundTruthRep("cube", "blue", ambient_light=0.3)
    r = evaluate_representation(bright, ShapePrompt("cube", "blue"), classifier=RecordingClassifier("cube", "red"))
    assert r["iou"] == 1.0 and abs(r["color_error"]) <= 1e-6
    assert r["prompt_correct"] == 0.0 and r["color_correct"] == 0.0 and r["shape_correct"] == 1.0
    # Same render scored against the default ambient: a real (non-zero) color error.
    gt_bright = bright.render(cams64, training=False)
    assert score_images(ShapePrompt("cube", "blue"), gt_bright.rgb, gt_bright.alpha, cams64)["color_error"] > 0.01


class UnlitGroundTruthRep(GroundTruthRep):
    """Renders the ground truth's flat colors, as the Gaussians render (evaluation_ambient None)."""

    def evaluation_ambient(self):
        return None

    def render(self, cameras, step=0, generator=None, training=True):
        gt = render_shape(self.shape, self.color, cameras, shading="albedo")
        return RenderOutput(rgb=gt.rgb, alpha=gt.mask, depth=torch.zeros_like(gt.mask))


def test_an_unlit_representation_is_scored_against_an_unlit_ground_truth(cams64):
    rep = UnlitGroundTruthRep("cube", "blue")
    r = evaluate_representation(rep, ShapePrompt("cube", "blue"), classifier=RecordingClassifier("cube", "blue"))
    assert r["iou"] == 1.0 and abs(r["color_error"]) <= 1e-6
    # Against the lit ground truth (what the Gaussians were compared with before) the same render errs.
    flat = rep.render(cams64, training=False)
    assert score_images(ShapePrompt("cube", "blue"), flat.rgb, flat.alpha, cams64)["color_error"] > 0.01


def test_evaluate_representation_rejects_unparseable_prompt():
    rep = GroundTruthRep("cube", "red")
    with pytest.raises(UserError, match="a dog"):
        evaluate_representation(rep, "a dog", classifier=RecordingClassifier("cube", "red"))
    assert rep.calls == []  # rejected before rendering
    assert parse_prompt("a dog") is None


# ----------------------------------------------------------------------------------------------
# 8. The command line
# ----------------------------------------------------------------------------------------------
def test_cli_eval_missing_run_folder(tmp_path, capsys, monkeypatch):
    from threedistill.shapes import classifier as classifier_mod

    # Independent of whether the shipped classifier exists yet: the folder check is under test.
    monkeypatch.setattr(classifier_mod, "load_classifier", lambda *a, **k: RecordingClassifier("cube", "red"))
    missing = tmp_path / "no-such-run"
    code = main(["eval", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(missing) in lines[0]


def test_cli_eval_needs_a_run_folder(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error:")


def test_cli_prior_eval_rejects_zero_samples(capsys, monkeypatch):
    import threedistill.priors as priors_mod

    def no_load(*a, **k):
        raise AssertionError("the prior must not be loaded for invalid arguments")

    monkeypatch.setattr(priors_mod, "load_prior", no_load)
    code = main(["prior", "eval", "--samples", "0"])
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--samples" in lines[0], err


def test_seed_diversity(cams64, gt64):
    from threedistill.shapes.evaluate import seed_diversity

    cube, sphere, blue = gt64("cube", "red"), gt64("sphere", "red"), gt64("cube", "blue")
    same = seed_diversity([(cube.rgb, cube.mask), (cube.rgb.clone(), cube.mask.clone())])
    assert same == {"silhouette_diversity": 0.0, "appearance_diversity": 0.0}
    # Independent: 1 - IoU of the two ground-truth masks; RGB difference over their union.
    a, b = cube.mask > 0.5, sphere.mask > 0.5
    d = seed_diversity([(cube.rgb, cube.mask), (sphere.rgb, sphere.mask)])
    assert d["silhouette_diversity"] == pytest.approx(1 - ((a & b).sum() / (a | b).sum()).item())
    assert d["silhouette_diversity"] > 0.05
    recolor = seed_diversity([(cube.rgb, cube.mask), (blue.rgb, blue.mask)])
    assert recolor["silhouette_diversity"] == 0.0
    assert recolor["appearance_diversity"] == pytest.approx((cube.rgb - blue.rgb).abs().mean(1)[a[:, 0]].mean().item())
    # Three results: the mean over the three pairs.
    three = seed_diversity([(cube.rgb, cube.mask), (cube.rgb, cube.mask), (sphere.rgb, sphere.mask)])
    assert three["silhouette_diversity"] == pytest.approx(2 / 3 * d["silhouette_diversity"])
    assert seed_diversity([(cube.rgb, cube.mask)])["silhouette_diversity"] != seed_diversity([(cube.rgb, cube.mask)])["silhouette_diversity"]  # NaN


def test_files_from_before_the_color_spelling_still_load(tmp_path):
    """Classifier weights and batch manifests written with "colour" names load under "color"."""
    import json

    from safetensors.torch import save_file

    from threedistill.batch.manifest import Manifest
    from threedistill.batch.rows import BatchRow
    from threedistill.shapes.classifier import ShapesClassifier, load_classifier

    model = ShapesClassifier()
    old_state = {k.replace("color_head.", "colour_head."): v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("colour_head.") for k in old_state)
    save_file(old_state, str(tmp_path / "old.safetensors"))
    loaded = load_classifier(tmp_path / "old.safetensors")
    assert torch.equal(loaded.color_head.weight, model.color_head.weight)

    row = BatchRow(id="r1", prompt="a red cube", seed=0)
    out = tmp_path / "batch"
    out.mkdir()
    entry = {**row.to_dict(), "run_dir": "r1", "state": "done", "attempts": 1, "error": None, "history": [],
             "wall_s": 1.0, "step": 5, "outputs": {}, "metrics": {"iou": 0.5, "colour_error": 0.25}}
    from threedistill.batch.manifest import MANIFEST

    (out / MANIFEST).write_text(json.dumps(entry) + "\n")
    manifest = Manifest.open(out, [row])
    assert manifest.rows()[0]["metrics"] == {"iou": 0.5, "color_error": 0.25}


def _disc(n_views: int, size: int, cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    m = ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r).float()
    return m[None, None].expand(n_views, 1, size, size).clone()


def test_size_shape_iou_and_haze_tell_size_from_shape():
    from threedistill.shapes.evaluate import silhouette_metrics

    truth = _disc(3, 64, 31.5, 31.5, 16.0)
    # The right shape at 70% of the size, off-centre: IoU is poor, shape IoU near 1, size ~0.49.
    small = _disc(3, 64, 25.0, 36.0, 11.2)
    m = silhouette_metrics(small, truth)
    area_ratio = small.sum().item() / truth.sum().item()
    assert m["size"] == pytest.approx(area_ratio)
    assert 0.4 < m["size"] < 0.6
    iou = ((small > 0.5) & (truth > 0.5)).sum().item() / ((small > 0.5) | (truth > 0.5)).sum().item()
    assert iou < 0.5 and m["shape_iou"] > 0.93
    # A wrong shape of the right area (a square) keeps a clearly lower shape IoU.
    square = torch.zeros_like(truth)
    half = int(round((torch.pi * 16.0 ** 2) ** 0.5 / 2))
    square[..., 32 - half:32 + half, 32 - half:32 + half] = 1.0
    assert silhouette_metrics(square, truth)["shape_iou"] < m["shape_iou"] - 0.04
    # Haze: alpha outside the dilated silhouette, per true pixel; none for the truth itself.
    assert silhouette_metrics(truth, truth)["haze"] == 0.0
    fog = truth.clone()
    fog[..., :4, :] = 0.25  # a faint band far from the disc: 4 rows x 64 px x 0.25 per view
    assert silhouette_metrics(fog, truth)["haze"] == pytest.approx(3 * 4 * 64 * 0.25 / truth.sum().item())


def test_color_noise_measures_speckle_not_shading():
    from threedistill.shapes.evaluate import high_frequency_energy

    mask = _disc(2, 64, 31.5, 31.5, 20.0) > 0.5
    ys = torch.linspace(0, 1, 64)[None, None, :, None].expand(2, 3, 64, 64)
    smooth = 0.3 + 0.5 * ys  # a shading gradient: almost no high frequency
    g = torch.Generator().manual_seed(0)
    speckled = smooth.clone()
    dots = torch.rand(2, 1, 64, 64, generator=g) < 0.1
    speckled[dots.expand_as(speckled)] = 0.0
    e_smooth, e_speckled = high_frequency_energy(smooth, mask), high_frequency_energy(speckled, mask)
    assert e_smooth < 1e-3
    # Independent estimate: a dark dot on a bright field differs from its 3x3 mean by 8/9 of the
    # field, its 8 neighbours each by 1/9 of it; 10% dots, ~0.55 mean field.
    assert e_speckled > 0.05 and e_speckled > 50 * e_smooth


def test_floater_fraction_counts_area_off_the_main_piece():
    import trimesh

    from threedistill.shapes.evaluate import floater_fraction

    main = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    speck = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    speck.apply_translation((2.0, 0.0, 0.0))
    both = trimesh.util.concatenate([main, speck])
    assert floater_fraction(main.vertices, main.faces) == 0.0
    assert floater_fraction(both.vertices, both.faces) == pytest.approx(0.06 / 6.06)
    # UV seams duplicate vertices: welding by position keeps one piece.
    split = trimesh.Trimesh(vertices=main.vertices[main.faces].reshape(-1, 3),
                            faces=np.arange(len(main.faces) * 3).reshape(-1, 3), process=False)
    assert floater_fraction(split.vertices, split.faces) == 0.0


def test_ground_truth_scores_perfect_on_the_new_metrics():
    from threedistill.shapes.evaluate import eval_cameras, score_images
    from threedistill.shapes.render import render_shape
    from threedistill.shapes.world import parse_prompt

    p = parse_prompt("a green mug")
    cams = eval_cameras(48)
    gt = render_shape(p.shape, p.color, cams, shading="diffuse", ambient=0.1)
    m = score_images(p, gt.rgb, gt.mask, cams, ambient=0.1)
    assert m["size"] == pytest.approx(1.0) and m["shape_iou"] == pytest.approx(1.0)
    assert m["haze"] == 0.0 and abs(m["color_noise"]) < 1e-9


def test_cli_eval_of_a_run_prints_and_writes_the_new_metrics(tmp_path, capsys):
    import json

    from threedistill.runs import RunFolder

    assert main(["generate", "a red cube", "--out", str(tmp_path), "run.name=r", "run.steps=2", "run.resolution=16",
                 "run.progress=false", "run.device=cpu", "export.turntable=false", "export.texture=false",
                 "export.mesh_resolution=32", "representation.nerf.num_samples=8"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    saved = json.loads(RunFolder(tmp_path / "r").eval_path.read_text())
    for key in ("shape_iou", "size", "haze", "color_noise"):
        assert key in saved
    assert f"shape IoU {saved['shape_iou']:.3f}" in line and f"size {saved['size']:.2f}" in line
    if "floaters" in saved:  # the 2-step blob may have no surface to export
        assert 0.0 <= saved["floaters"] <= 1.0 and "floaters" in line
        assert 0.0 <= saved["mesh_iou"] <= 1.0 and f"exported mesh IoU {saved['mesh_iou']:.3f}" in line


def _ground_truth_glb(path, shape, color, scale=1.0):
    """The ground-truth mesh of ``shape`` with its color as vertex colors, scaled about the origin,
    written as a Y-up GLB the way exports are (placement recorded)."""
    from threedistill.export import save_mesh
    from threedistill.shapes.world import shape_mesh

    mesh = shape_mesh(shape).copy()
    mesh.apply_scale(scale)
    rgba = np.tile(np.append(np.round(np.asarray(COLORS[color]) * 255), 255).astype(np.uint8), (len(mesh.vertices), 1))
    mesh.visual.vertex_colors = rgba
    save_mesh(mesh, path, "glb")
    return path


def test_exported_mesh_file_is_scored_against_the_ground_truth(tmp_path):
    """The ground truth's own mesh, written to a GLB, scores (nearly) perfectly; the same mesh at
    0.8x scores the size it has (0.64 of the area), and a wrongly colored one a color error near
    the two colors' difference."""
    from threedistill.shapes.evaluate import evaluate_mesh_file

    right = evaluate_mesh_file(_ground_truth_glb(tmp_path / "s.glb", "sphere", "blue"), "a blue sphere", ambient=0.1)
    assert right["mesh_iou"] > 0.97 and right["mesh_color_error"] < 0.02
    assert right["mesh_size"] == pytest.approx(1.0, abs=0.03)
    small = evaluate_mesh_file(_ground_truth_glb(tmp_path / "k.glb", "sphere", "blue", 0.8), "a blue sphere", ambient=0.1)
    assert small["mesh_size"] == pytest.approx(0.64, abs=0.03) and small["mesh_shape_iou"] > 0.95
    assert small["mesh_iou"] == pytest.approx(0.64, abs=0.04)
    wrong = evaluate_mesh_file(_ground_truth_glb(tmp_path / "r.glb", "sphere", "red"), "a blue sphere", ambient=None)
    expected = float(np.abs(np.asarray(COLORS["red"]) - np.asarray(COLORS["blue"])).mean())
    assert wrong["mesh_color_error"] == pytest.approx(expected, abs=0.03)  # unlit: the albedo difference
    with pytest.raises(UserError, match="not a shapes-world prompt"):
        evaluate_mesh_file(tmp_path / "s.glb", "a hamburger")
