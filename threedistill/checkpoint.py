"""Checkpoints: one safetensors file of tensors plus one JSON file of everything else, per step.

Layout in ``<run>/checkpoints/``::

    step_000250.safetensors   representation.*, guidance.* (trainable state only), optim.<param>.<key>
    step_000250.json          {"step": 250, "optimizer": {param_groups + non-tensor state}, ...}

The JSON is written last, so a checkpoint counts only once its JSON exists; both files are
written atomically. The frozen prior is never saved. Nothing here uses pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from threedistill.atomic import atomic_path, atomic_write_text
from threedistill.errors import UserError

_NAME = re.compile(r"^step_(\d{6,})\.json$")


def checkpoint_paths(ckpt_dir: Path, step: int) -> tuple[Path, Path]:
    return ckpt_dir / f"step_{step:06d}.safetensors", ckpt_dir / f"step_{step:06d}.json"


def latest_checkpoint(ckpt_dir: Path) -> Optional[int]:
    """The newest complete checkpoint step in ``ckpt_dir`` (None if there is none)."""
    if not ckpt_dir.is_dir():
        return None
    steps = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m and checkpoint_paths(ckpt_dir, int(m.group(1)))[0].is_file():
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """The steps of the complete checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))
                  and checkpoint_paths(ckpt_dir, int(m.group(1)))[0].is_file())


def remove_checkpoint(ckpt_dir: Path, step: int) -> None:
    """Delete the checkpoint of ``step``: its JSON first, so it stops counting before its tensors go."""
    st_path, json_path = checkpoint_paths(ckpt_dir, step)
    json_path.unlink(missing_ok=True)
    st_path.unlink(missing_ok=True)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    sd = opt.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> dict:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for pid, kv in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(kv)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _module_tensors(prefix: str, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        out[f"{prefix}.{k}"] = v.detach().contiguous().cpu().clone()
    return out


def save_checkpoint(ckpt_dir: Path, step: int, representation: torch.nn.Module, guidance: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``step_<step>.safetensors`` and ``.json`` atomically; returns the JSON path."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = _module_tensors("representation", representation)
    tensors.update(_module_tensors("guidance", guidance))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    st_path, json_path = checkpoint_paths(ckpt_dir, step)
    with atomic_path(st_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "threedistill-checkpoint", "step": str(step)})
    meta = {"step": step, "optimizer": opt_meta, **(extra or {})}
    atomic_write_text(json_path, json.dumps(meta, indent=1, default=str))
    return json_path


def load_checkpoint(ckpt_dir: Path, step: int, representation: torch.nn.Module, guidance: Optional[torch.nn.Module],
                    optimizer: Optional[torch.optim.Optimizer], device: torch.device) -> Dict[str, Any]:
    st_path, json_path = checkpoint_paths(ckpt_dir, step)
    try:
        meta = json.loads(json_path.read_text())
        tensors = load_file(str(st_path), device="cpu")  # optimizer "step" must stay on CPU
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint '{st_path}' is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None

    def sub(prefix: str) -> Dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    try:
        representation.load_state_dict(sub("representation"))
        if guidance is not None:
            guidance.load_state_dict(sub("guidance"))
    except RuntimeError as e:
        raise UserError(
            f"checkpoint '{st_path}' does not match this configuration ({str(e).splitlines()[0]}); "
            "resume with the run's own config.yaml"
        ) from None
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    return meta
