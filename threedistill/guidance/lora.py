"""Trainable guidance state for VSD and ESD: a LoRA on the prior's own UNet plus a camera embedding.

ProlificDreamer's variational score estimates the score of the *current* 3D scene's renders with a
copy of the prior fine-tuned on those renders. Here that copy costs no second UNet: a peft LoRA
adapter is added to the frozen prior's UNet and switched on only inside :meth:`CameraLoRA.active`,
so every other call (the guided prediction of the same step, other runs sharing the prior) sees
the frozen weights. The camera enters as ProlificDreamer does it: the flattened camera-to-world
matrix goes through a small MLP into the UNet's class embedding (added to its time embedding);
a zero camera means "no camera" (dropout, ESD's camera-free term).

The adapter's parameters are registered here (shared, not copied), so they sit in this module's
``state_dict`` (checkpoints) and ``parameters()`` (the optimizer group); names drop the adapter's
instance name so that a checkpoint restores into any new instance.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from typing import Iterator, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from threedistill.errors import UserError

#: Attention projections that get a LoRA (all attention layers of a diffusers UNet).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CAMERA_DIM = 16  # the flattened 4x4 camera-to-world matrix

_instance_ids = itertools.count()


def _drop_adapter(unet: nn.Module, name: str) -> None:
    try:
        unet.delete_adapters(name)
    except Exception:  # the UNet may already be gone or torn down at shutdown
        pass


class CameraLoRA(nn.Module):
    """LoRA (rank ``rank``) on the attention projections of ``prior.unet`` plus a camera MLP into its
    class embedding. Initially an identity: LoRA B and the MLP's last layer start at zero."""

    def __init__(self, prior, rank: int = 4, camera_dropout: float = 0.1, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        unet = getattr(prior, "unet", None)
        if unet is None or not hasattr(unet, "add_adapter"):
            raise UserError(f"this guidance trains a LoRA on the prior's UNet, but prior '{prior.name}' exposes no "
                            f"diffusers UNet")
        if getattr(unet, "class_embedding", None) is not None:
            raise UserError(f"prior '{prior.name}': its UNet already uses a class embedding, so the camera "
                            f"embedding of vsd/esd cannot be attached to it")
        try:
            from peft import LoraConfig
        except ImportError:  # pragma: no cover - peft is a dependency
            raise UserError("vsd/esd need the peft package: pip install peft") from None
        object.__setattr__(self, "prior", prior)  # not a submodule: the frozen UNet is never saved
        object.__setattr__(self, "unet", unet)
        self.camera_dropout = float(camera_dropout)
        self._active = False  # inside active()
        #: Recompute the UNet's activations in the backward of :meth:`training_loss` (the only UNet
        #: call with autograd on) instead of keeping them.
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.adapter_name = f"threedistill_lora_{next(_instance_ids)}"
        config = LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights=True, target_modules=LORA_TARGETS)
        with warnings.catch_warnings():  # several runs may share one prior, each with its own adapter
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            unet.add_adapter(config, adapter_name=self.adapter_name)
        unet.disable_adapters()  # on only inside active()
        weakref.finalize(self, _drop_adapter, unet, self.adapter_name).atexit = False

        tag = f".{self.adapter_name}."
        params = {}
        for name, p in unet.named_parameters():
            if tag in name:
                p.data = p.data.float()  # fp32 adapter weights on an fp16 UNet
                p.requires_grad_(True)
                params[name.replace(tag, ".").replace(".", "__")] = p
        if not params:
            raise UserError(f"prior '{prior.name}': its UNet has no attention projections ({', '.join(LORA_TARGETS)}) "
                            f"to put a LoRA on")
        self.lora = nn.ParameterDict(params)
        emb_dim = _time_embedding_dim(unet)
        self.camera_embedding = nn.Sequential(nn.Linear(CAMERA_DIM, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        nn.init.zeros_(self.camera_embedding[2].weight)
        nn.init.zeros_(self.camera_embedding[2].bias)
        self.camera_embedding.to(prior.device)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside this block the UNet runs with this LoRA and camera embedding."""
        unet = self.unet
        unet.set_adapter(self.adapter_name)
        unet.enable_adapters()
        unet.class_embedding = self.camera_embedding
        self._active = True
        try:
            yield
        finally:
            self._active = False
            unet.class_embedding = None
            unet.disable_adapters()
            # peft's disable also clears requires_grad on the adapter weights, which would drop the
            # gradient of a LoRA forward whose backward runs after this block: keep them trainable.
            for p in self.lora.values():
                p.requires_grad_(True)

    @staticmethod
    def camera_condition(c2w: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B,16]`` flattened camera-to-world matrices; rows where ``keep`` is False are zero (no camera)."""
        cam = c2w.reshape(c2w.shape[0], CAMERA_DIM).float()
        if keep is not None:
            cam = cam * keep.to(cam).view(-1, 1)
        return cam

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, camera: torch.Tensor,
                text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Epsilon of the LoRA model for ``x_t`` at ``t`` with text ``[B,L,D]`` and camera condition ``[B,16]``."""
        with self.active():
            return self.prior.predict_noise(x_t, t, text, text_mask, class_labels=camera.to(self.prior.device))

    def training_loss(self, z: torch.Tensor, text: torch.Tensor, c2w: torch.Tensor,
                      text_mask: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The ordinary denoising loss of the LoRA model on the (detached) renders ``z`` in model space,
        at ``t ~ U{0, ..., T-1}``, with the camera dropped for a ``camera_dropout`` fraction."""
        prior = self.prior
        B = z.shape[0]
        t = torch.randint(0, prior.num_train_timesteps, (B,), generator=generator).to(prior.device)
        noise = torch.randn(z.shape, generator=generator).to(device=prior.device, dtype=torch.float32)
        keep = torch.rand(B, generator=generator) >= self.camera_dropout
        camera = self.camera_condition(c2w, keep).to(prior.device)
        with self.active(), self.checkpointing():
            return prior.denoising_loss(z.detach(), noise, t, text, text_mask, class_labels=camera)

    @contextlib.contextmanager
    def checkpointing(self) -> Iterator[None]:
        """diffusers' gradient checkpointing of the UNet blocks, for this block only (other runs
        sharing the prior, and every no-grad call, run as before). The recorded graph keeps its
        checkpoints after the block: see :meth:`_checkpoint` for the recomputation."""
        unet = self.unet
        if not self.gradient_checkpointing or not getattr(unet, "_supports_gradient_checkpointing", False):
            yield
            return
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint)
        try:
            yield
        finally:
            unet.disable_gradient_checkpointing()

    def _checkpoint(self, block: nn.Module, *args):
        """One UNet block under non-reentrant ``torch.utils.checkpoint``. Its recomputation runs in
        the backward, which the distiller calls after :meth:`active` has switched the adapter off:
        recomputing without the LoRA would give other activations (torch notices a different number
        of saved tensors, or worse, does not), so the recomputation switches it back on."""

        def run(*inputs):
            if self._active:
                return block(*inputs)
            with self._adapter_on(block):  # the recomputation, in the backward
                return block(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    @contextlib.contextmanager
    def _adapter_on(self, root: nn.Module) -> Iterator[None]:
        """This LoRA on in the peft layers under ``root`` only (one UNet block: cheaper than
        :meth:`active`'s walk over the whole UNet, once per block in every backward), their state
        restored after."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in root.modules() if isinstance(m, BaseTunerLayer)]
        saved = [(m, list(m.active_adapters), bool(m.disable_adapters)) for m in layers]
        for m in layers:
            m.enable_adapters(True)
            m.set_adapter(self.adapter_name)
        try:
            yield
        finally:
            for m, active, disabled in saved:
                m.set_adapter(active)
                m.enable_adapters(not disabled)
            for p in self.lora.values():  # peft clears requires_grad on disabled / inactive adapters
                p.requires_grad_(True)


def use_gradient_checkpointing(setting, prior) -> bool:
    """``guidance.gradient_checkpointing``: "auto" is on for a prior on CUDA whose images are at least
    256 px (Stable Diffusion's 512, where the LoRA training forward keeps the UNet's activations
    for the backward), off elsewhere (the tiny and shapes priors, CPU runs: time matters more)."""
    flag = str(setting).strip().lower()
    if flag == "auto":
        return prior.device.type == "cuda" and int(getattr(prior, "image_resolution", 0)) >= 256
    return flag == "true"


def _time_embedding_dim(unet: nn.Module) -> int:
    """Width of the UNet's time embedding (what a class embedding is added to)."""
    emb = getattr(unet, "time_embedding", None)
    last = getattr(emb, "linear_2", None)
    if isinstance(last, nn.Linear):
        return int(last.out_features)
    raise UserError("the prior's UNet has no TimestepEmbedding to add a camera embedding to")
