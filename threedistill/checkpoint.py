"""Checkpoints: one safetensors file of tensors plus one JSON file of everything else, per step.

Layout in ``<run>/checkpoints/``::

    step_000250.safetensors   representation.*, guidance.* (trainable state only), optim.<param>.<key>
    step_000250.json          {"step": 250, "optimizer": {param_groups + non-tensor state}, ...}

The JSON is written last, so a checkpoint counts only once its JSON exists; both files are
written atomically. The frozen prior is never saved. Nothing here uses pickle.

A checkpoint that does not load (a truncated, empty or garbage file, a bad sidecar, a tensor of
the wrong shape) is skipped by :func:`load_latest_checkpoint` with a one-line warning, and the one
before it is used; when none loads, the error is one line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from threedistill.atomic import atomic_path, atomic_write_text
from threedistill.errors import UserError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{6,})\.json$")


def checkpoint_paths(ckpt_dir: Path, step: int) -> tuple[Path, Path]:
    return ckpt_dir / f"step_{step:06d}.safetensors", ckpt_dir / f"step_{step:06d}.json"


def latest_checkpoint(ckpt_dir: Path) -> Optional[int]:
    """The newest complete checkpoint step in ``ckpt_dir`` (None if there is none); whether it
    loads is :func:`load_latest_checkpoint`'s question."""
    steps = checkpoint_steps(ckpt_dir)
    return steps[-1] if steps else None


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


class CheckpointError(UserError):
    """A checkpoint that does not load: ``reason`` says why in a few words, ``mismatch`` whether it
    was read but does not fit the modules (else the files are unreadable)."""

    def __init__(self, message: str, reason: str, mismatch: bool):
        super().__init__(message)
        self.reason, self.mismatch = reason, mismatch


def _first_line(e: BaseException) -> str:
    """The exception's type and its first informative line (torch's state-dict errors start with
    a header line, "Error(s) in loading state_dict for X:")."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Refuse optimizer state whose tensors do not fit the parameters (torch would only fail at
    the next step): every state tensor with dimensions (Adam's moments) has its parameter's shape."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, kv in state["state"].items():
        if not 0 <= pid < len(params):
            raise ValueError(f"optimizer state for parameter {pid} of {len(params)}")
        for k, v in kv.items():
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(params[pid].shape):
                raise ValueError(f"optimizer state {pid}.{k} has shape {tuple(v.shape)}, its parameter "
                                 f"{tuple(params[pid].shape)}")


def load_checkpoint(ckpt_dir: Path, step: int, representation: torch.nn.Module, guidance: Optional[torch.nn.Module],
                    optimizer: Optional[torch.optim.Optimizer], device: torch.device) -> Dict[str, Any]:
    """Load the checkpoint of ``step`` into the modules (and ``optimizer``); returns its JSON.

    A checkpoint that does not load raises a one-line :class:`UserError`; the modules may then
    hold part of it (load another checkpoint into them, or drop them)."""
    st_path, json_path = checkpoint_paths(ckpt_dir, step)
    path = json_path
    try:
        meta = json.loads(json_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("it holds no JSON object")
        path = st_path
        tensors = load_file(str(st_path), device="cpu")  # optimizer "step" must stay on CPU
    except (OSError, ValueError, SafetensorError) as e:
        why = f"{path.name}: {_first_line(e)}"
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({_first_line(e)})", f"unreadable {why}",
                              False) from None

    def sub(prefix: str) -> Dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    try:
        representation.load_state_dict(sub("representation"))
        if guidance is not None:
            guidance.load_state_dict(sub("guidance"))
        if optimizer is not None:
            state = _unflatten_optimizer(tensors, meta["optimizer"])
            _check_optimizer_state(optimizer, state)
            optimizer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        why = _first_line(e)
        raise CheckpointError(f"checkpoint '{st_path}' does not match this configuration ({why}); "
                              "resume with the run's own config.yaml", f"does not fit: {why}", True) from None
    return meta


def load_latest_checkpoint(ckpt_dir: Path, representation: torch.nn.Module, guidance: Optional[torch.nn.Module],
                           optimizer: Optional[torch.optim.Optimizer],
                           device: torch.device) -> Optional[Tuple[int, Dict[str, Any]]]:
    """``(step, meta)`` of the newest checkpoint in ``ckpt_dir`` that loads (see
    :func:`load_checkpoint`), None when there is no checkpoint at all.

    Newer ones that do not load are skipped, each with a one-line warning (logged), once an older
    one has loaded. Every load replaces the whole state (strict ``load_state_dict``, the whole
    optimizer state), so what a skipped checkpoint left in the modules is overwritten: the result
    equals loading the older checkpoint directly. When none loads: one :class:`UserError` line
    naming the newest checkpoint's problem."""
    steps = checkpoint_steps(ckpt_dir)[::-1]  # newest first
    failures: List[CheckpointError] = []
    for step in steps:
        try:
            meta = load_checkpoint(ckpt_dir, step, representation, guidance, optimizer, device)
        except CheckpointError as e:
            failures.append(e)
            continue
        for bad, e in zip(steps, failures):
            log.warning("skipped checkpoint step %d of '%s' (%s); using step %d", bad, ckpt_dir, e.reason, step)
        return step, meta
    if not failures:
        return None
    newest = failures[0]
    if all(e.mismatch for e in failures):  # most likely a changed config, not damage
        raise UserError(f"no checkpoint of the {len(steps)} in '{ckpt_dir}' fits this configuration; the newest: "
                        f"{newest}")
    raise UserError(f"no checkpoint of the {len(steps)} in '{ckpt_dir}' loads (the newest, step {steps[0]}: "
                    f"{newest.reason}); remove '{ckpt_dir}' to start the run again from step 0")
