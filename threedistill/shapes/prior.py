"""The built-in shapes prior: a small pixel-space text-to-image diffusion model of the shapes world.

It is an ordinary diffusers pipeline folder (``UNet2DConditionModel`` on 3x64x64 pixels, a CLIP text
encoder, a CLIP tokenizer in which the shapes-world words are single tokens (all but "torus", which
BPE splits into 4; the tokenizer is saved with the weights, so it stays as trained), a ``DDPMScheduler``), so it
loads through the same :class:`~threedistill.priors.DiffusersPrior` as Stable Diffusion; the name
``shapes`` points at the copy shipped in ``threedistill/assets/shapes-prior`` (package data).

Training (``threedistill prior train OUT``), resumable at any checkpoint:

* Data: :func:`generate_dataset` renders every held-in prompt from cameras drawn with the project's
  :class:`~threedistill.cameras.CameraSampler` (default camera ranges), with NeRF-like shading
  (albedo, or diffuse with the sampler's point light and the NeRF's ambient term) on the white
  shapes-world background, and stores them as uint8 in ``OUT/dataset.pt``.
* Text per image: the empty prompt with probability ``cfg_dropout`` (classifier-free guidance),
  else the prompt with its view suffix (exactly :func:`~threedistill.priors.view_prompt`) or, half
  of the time, the bare prompt.
* Objective: epsilon MSE at uniform timesteps, AdamW on UNet and text encoder together, an EMA of
  the weights; the EMA weights are exported as the pipeline.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from threedistill.atomic import atomic_path, atomic_write_text
from threedistill.cameras import CameraConfig, CameraSampler
from threedistill.devices import resolve_device
from threedistill.errors import UserError
from threedistill.priors import ASSETS_DIR, SHIPPED_PRIOR  # noqa: F401  (where the shipped prior lives; re-exported)
from threedistill.priors.base import view_prompt
from threedistill.priors.tiny import build_clip_tokenizer, save_pipeline_folder, write_clip_vocab_files
from threedistill.representations.nerf import NerfConfig
from threedistill.shapes.render import render_shape
from threedistill.shapes.world import BACKGROUND, ShapePrompt, training_prompts, vocabulary

IMAGE_SIZE = 64
TEXT_DIM = 64
MAX_TOKENS = 16
VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class PriorTrainConfig:
    steps: int = 6000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    cfg_dropout: float = 0.1
    view_suffix_prob: float = 0.5
    images_per_prompt: int = 256
    albedo_prob: float = 0.25
    checkpoint_every: int = 250
    seed: int = 0
    # Min-SNR-gamma loss weighting (Hang et al. 2023), for epsilon prediction min(SNR, gamma) / SNR:
    # the nearly-clean timesteps, whose noise is hard to predict and matters little for the image
    # (or for score distillation), stop dominating the loss; converges ~3x faster. 0 = plain MSE.
    min_snr_gamma: float = 5.0
    # "v_prediction" (default) or "epsilon". The cosine schedule's terminal SNR is ~2e-9, where an
    # epsilon model cannot tell x0 from x_T: its first sampling steps guess the image's colors at
    # random (samples came out on random tinted backgrounds after 1000 steps). v = sqrt(abar) eps -
    # sqrt(1 - abar) x0 stays well posed there (Salimans & Ho 2022; Lin et al. 2023).
    prediction_type: str = "v_prediction"


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def build_tokenizer():
    return build_clip_tokenizer(vocabulary(), model_max_length=MAX_TOKENS)


def build_models(seed: int = 0, prediction_type: str = "v_prediction"):
    """(unet, text_encoder, tokenizer, scheduler), freshly initialized."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        # Cross-attention only at 16x16 (and the mid block): attention at 32x32 costs 3x the time.
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type=prediction_type, clip_sample=True)
    return unet, text_encoder, tokenizer, scheduler


def save_pipeline(out: Path, unet, text_encoder, tokenizer, scheduler) -> Path:
    """Write a diffusers pipeline folder (``model_index.json`` + components) at ``out``."""
    components = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
    save_pipeline_folder(out, components, "DiffusionPipeline")
    write_clip_vocab_files(out / "tokenizer", vocabulary())
    return out


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def render_views(prompt: ShapePrompt, n: int, generator: torch.Generator, albedo_prob: float = 0.25,
                 camera_cfg: Optional[CameraConfig] = None, ambient: Optional[float] = None,
                 resolution: int = IMAGE_SIZE):
    """``n`` ground-truth renders of ``prompt`` from sampler cameras: (images [n,3,R,R] in [0,1],
    view labels). Shading per image: albedo with probability ``albedo_prob``, else diffuse lit by the
    sampler's light with the NeRF's default ambient term."""
    camera_cfg = camera_cfg or CameraConfig()
    ambient = NerfConfig.ambient_light if ambient is None else ambient
    cams = CameraSampler(camera_cfg, resolution).sample(generator, batch_size=n)
    albedo_mask = torch.rand(n, generator=generator) < albedo_prob
    gt = render_shape(prompt.shape, prompt.color, cams, shading="diffuse", ambient=ambient)
    # Albedo shading is the uniform color over the (same) mask.
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    flat = gt.mask * torch.tensor(prompt.albedo).view(1, 3, 1, 1) + (1.0 - gt.mask) * bg
    images = torch.where(albedo_mask[:, None, None, None], flat, gt.rgb)
    labels = cams.view_labels(camera_cfg.front_threshold, camera_cfg.back_threshold, camera_cfg.overhead_threshold)
    return images, labels


def generate_dataset(prompts: List[ShapePrompt], images_per_prompt: int, seed: int = 0,
                     albedo_prob: float = 0.25, progress: Optional[Callable[[int], None]] = None) -> Dict[str, object]:
    """Render ``images_per_prompt`` views of every prompt. Returns a dict with ``images`` (uint8
    ``[N,3,64,64]``), ``prompt_index`` ``[N]``, ``view_index`` ``[N]`` (into :data:`VIEW_LABELS`) and
    ``prompts`` (the prompt strings)."""
    g = torch.Generator().manual_seed(seed)
    images, p_idx, v_idx = [], [], []
    for i, prompt in enumerate(prompts):
        for start in range(0, images_per_prompt, 64):
            n = min(64, images_per_prompt - start)
            imgs, labels = render_views(prompt, n, g, albedo_prob)
            images.append((imgs * 255.0).round().to(torch.uint8))
            p_idx += [i] * n
            v_idx += [VIEW_LABELS.index(lbl) for lbl in labels]
        if progress is not None:
            progress(1)
    return {
        "images": torch.cat(images),
        "prompt_index": torch.tensor(p_idx),
        "view_index": torch.tensor(v_idx),
        "prompts": [p.text for p in prompts],
    }


def caption_table(prompts: List[str]) -> List[str]:
    """All captions training can use: ``""``, then per prompt the bare prompt and its 4 view prompts."""
    table = [""]
    for p in prompts:
        table.append(p)
        table += [view_prompt(p, v) for v in VIEW_LABELS]
    return table


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """Per-item loss weights under Min-SNR-gamma, with ``SNR = abar / (1 - abar)``: the x0-space
    weight ``min(SNR, gamma)`` divided by what the prediction's MSE already carries, ``SNR`` for
    epsilon and ``SNR + 1`` for v. All ones when ``gamma <= 0``."""
    if gamma <= 0:
        return torch.ones_like(alphas_cumprod_t)
    snr = alphas_cumprod_t / (1.0 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / (snr + 1.0 if v_prediction else snr)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _load_tensors(path: Path, device) -> Any:
    """A file this trainer saved (tensors, numbers, text, in dicts and lists), loaded with
    ``weights_only=True``: a planted pickle in the training folder cannot run code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError (not plain data), truncated or foreign files
        raise UserError(f"'{path}' is not a file this trainer wrote ({type(e).__name__}); remove it to start "
                        f"that part again") from None


class PriorTrainer:
    """Resumable training of the shapes prior in the folder ``out``.

    ``out/dataset.pt`` (made once), ``out/state.pt`` (models, EMA, optimizer, RNG, step; written
    atomically every ``checkpoint_every`` steps and at the end or on Ctrl-C), ``out/pipeline``
    (the EMA weights as a diffusers pipeline, refreshed with each checkpoint), ``out/log.jsonl``.
    """

    def __init__(self, out: str | Path, cfg: Optional[PriorTrainConfig] = None,
                 init_from: Optional[str | Path] = None, device: str = "auto") -> None:
        self.out = Path(out)
        # Where the models and the dataset live. Every random draw still comes from one CPU
        # generator, so a run's data order does not depend on the device it resumes on.
        self.device = device
        # A pipeline folder whose UNet and text encoder start a *fresh* training folder (e.g. the
        # shipped prior, to continue training it on another machine without its optimizer state).
        # "shapes" (the built-in name) is the shipped prior, wherever the package is installed.
        if init_from is not None and str(init_from) == "shapes" and not Path("shapes").exists():
            init_from = SHIPPED_PRIOR
        self.init_from = Path(init_from) if init_from is not None else None
        self.state_path = self.out / "state.pt"
        saved_cfg = self.out / "train_config.json"
        if saved_cfg.is_file():
            saved = PriorTrainConfig(**json.loads(saved_cfg.read_text()))
            if cfg is not None:
                saved.steps = cfg.steps  # a resume may extend the run; everything else stays
            cfg = saved
        self.cfg = cfg or PriorTrainConfig()

    def _dataset(self, log: Callable[[str], None]):
        path = self.out / "dataset.pt"
        if path.is_file():
            return _load_tensors(path, "cpu")
        from tqdm import tqdm

        prompts = training_prompts()
        t0 = time.time()
        with tqdm(total=len(prompts), desc="rendering dataset", unit="prompt") as bar:
            data = generate_dataset(prompts, self.cfg.images_per_prompt, seed=self.cfg.seed,
                                    albedo_prob=self.cfg.albedo_prob, progress=bar.update)
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        log(f"rendered {len(data['images'])} images in {time.time() - t0:.0f} s")
        return data

    def train(self, log: Callable[[str], None] = print) -> Path:
        from tqdm import tqdm

        c = self.cfg
        device = resolve_device(self.device)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "train_config.json", json.dumps(asdict(c), indent=2) + "\n")
        torch.manual_seed(c.seed)
        data = self._dataset(log)
        if c.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction_type must be 'epsilon' or 'v_prediction', got '{c.prediction_type}'")
        unet, text_encoder, tokenizer, scheduler = build_models(c.seed, c.prediction_type)
        if self.init_from is not None and not self.state_path.is_file():
            self._load_pipeline_weights(unet, text_encoder)
            log(f"initialized from {self.init_from}")
        unet.to(device)
        text_encoder.to(device)
        captions = caption_table(data["prompts"])
        token_ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids.to(device)
        images = data["images"].to(device)
        prompt_index, view_index = data["prompt_index"].to(device), data["view_index"].to(device)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        ema = [p.detach().clone() for p in params]
        step, elapsed = 0, 0.0
        rng = torch.Generator().manual_seed(c.seed + 1)
        if self.state_path.is_file():
            state = _load_tensors(self.state_path, device)
            unet.load_state_dict(state["unet"])
            text_encoder.load_state_dict(state["text_encoder"])
            opt.load_state_dict(state["optimizer"])
            for e, s in zip(ema, state["ema"]):
                e.copy_(s)
            rng.set_state(state["rng"].cpu())
            step, elapsed = int(state["step"]), float(state["elapsed"])
            log(f"resuming at step {step}")
        self._truncate_log(step)
        if step >= c.steps:
            log(f"already trained {step} steps (>= {c.steps})")
            return self.export(ema, unet, text_encoder, tokenizer, scheduler, step, elapsed)

        alphas = scheduler.alphas_cumprod.float().to(device)
        v_prediction = c.prediction_type == "v_prediction"
        n_images = len(images)
        log(f"training on {device}")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        n_views = len(VIEW_LABELS)

        def checkpoint() -> Path:
            state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                     "optimizer": opt.state_dict(), "ema": ema, "rng": rng.get_state(), "step": step,
                     "elapsed": elapsed}
            with atomic_path(self.state_path) as tmp:
                torch.save(state, tmp)
            return self.export(ema, unet, text_encoder, tokenizer, scheduler, step, elapsed)

        unet.train()
        text_encoder.train()
        bar = tqdm(total=c.steps, initial=step, desc="training shapes prior", unit="step")
        log_file = (self.out / "log.jsonl").open("a", encoding="utf-8")
        # `kill` (SIGTERM) saves a checkpoint like Ctrl-C does, so a background run stops cleanly.
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            while step < c.steps:
                t_start = time.time()
                idx = torch.randint(0, n_images, (c.batch_size,), generator=rng).to(device)
                x0 = images[idx].float() / 127.5 - 1.0
                p_i = prompt_index[idx]
                v_i = view_index[idx]
                u = torch.rand(c.batch_size, generator=rng).to(device)
                with_view = torch.rand(c.batch_size, generator=rng).to(device) < c.view_suffix_prob
                cap = 1 + p_i * (1 + n_views) + torch.where(with_view, 1 + v_i, torch.zeros_like(v_i))
                cap = torch.where(u < c.cfg_dropout, torch.zeros_like(cap), cap)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (c.batch_size,), generator=rng).to(device)
                noise = torch.randn(x0.shape, generator=rng).to(device)
                a = alphas[t].view(-1, 1, 1, 1)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
                text = text_encoder(token_ids[cap])[0]
                pred = unet(x_t, t, encoder_hidden_states=text).sample
                target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_prediction else noise
                per_item = (pred - target).square().mean(dim=(1, 2, 3))
                loss = (per_item * min_snr_weights(alphas[t], c.min_snr_gamma, v_prediction)).mean()
                lr = c.lr * min(1.0, (step + 1) / max(1, c.warmup_steps))
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                decay = min(c.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for e, p in zip(ema, params):
                        e.lerp_(p.detach(), 1.0 - decay)
                step += 1
                elapsed += time.time() - t_start
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                log_file.write(json.dumps({"step": step, "loss": round(loss.item(), 5), "lr": lr,
                                           "elapsed_s": round(elapsed, 1)}) + "\n")
                if step % c.checkpoint_every == 0:
                    log_file.flush()
                    checkpoint()
        except KeyboardInterrupt:
            log(f"interrupted at step {step}; saving a checkpoint")
            checkpoint()
            raise
        finally:
            bar.close()
            log_file.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        return checkpoint()

    def _load_pipeline_weights(self, unet, text_encoder) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = self.init_from
        if not (folder / "model_index.json").is_file():
            raise UserError(f"--init-from '{folder}' is not a pipeline folder (no model_index.json)")
        try:
            unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
            text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict())
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(f"--init-from '{folder}': not a shapes-prior pipeline ({str(e).splitlines()[0]})") from None

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past ``step`` (written after the checkpoint a resume starts from)."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def export(self, ema, unet, text_encoder, tokenizer, scheduler, step: int, elapsed: float) -> Path:
        """Write the EMA weights as a pipeline in ``out/pipeline`` (via a temporary folder)."""
        import shutil

        params = list(unet.parameters()) + list(text_encoder.parameters())
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        final = self.out / "pipeline"
        tmp = self.out / ".pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        meta = {"steps": step, "train_seconds": round(elapsed, 1), "train_config": asdict(self.cfg)}
        save_pipeline(tmp, unet, text_encoder, tokenizer, scheduler)
        atomic_write_text(tmp / "training.json", json.dumps(meta, indent=2) + "\n")
        old = self.out / ".pipeline.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
        return final
