"""The optimization loop: build everything from a config, distill, checkpoint, export.

Front ends (CLI, web app, batch) construct a :class:`Distiller` and call :meth:`Distiller.run`;
none re-implements a step. Observers hook in through :class:`Callback`. Everything the run writes
goes into its :class:`~threedistill.runs.RunFolder` (the layout is described there).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from threedistill.cameras import (STREAM_CAMERAS, STREAM_GUIDANCE, STREAM_RENDER, CameraSampler, max_resolution,
                                  preview_cameras, step_generator)
from threedistill.checkpoint import checkpoint_steps, load_latest_checkpoint, remove_checkpoint, save_checkpoint
from threedistill.config import Config
from threedistill.devices import ThreadGovernor, choose_threads, profile_on, resolve_device, set_tf32, stats_every
from threedistill.errors import UserError
from threedistill.export import export_run_meshes, image_grid, render_turntable, save_image
from threedistill.export.check import mesh_frame_renderer
from threedistill.groups import exponential_decay, scheduled
from threedistill.guidance import build_guidance
from threedistill.priors import PriorCache
from threedistill.representations import RepresentationContext, build_representation
from threedistill.runs import RunFolder

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------
class Callback:
    """Override what you need. ``distiller.request_stop()`` ends the run after the current step
    (a checkpoint is written, the run stays resumable); during the export, before the next output
    (the run is ``stopped`` with ``export_pending``: resuming it writes the outputs)."""

    def on_start(self, distiller: "Distiller") -> None: ...

    def on_step(self, distiller: "Distiller", step: int, stats: Dict[str, float]) -> None: ...

    def on_preview(self, distiller: "Distiller", step: int, path: Path) -> None: ...

    def on_checkpoint(self, distiller: "Distiller", step: int, path: Path) -> None: ...

    def on_end(self, distiller: "Distiller", result: "RunResult") -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "finished" or "stopped"
    step: int
    outputs: Dict[str, str] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def check_prompt(prompt: str) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("the prompt is empty: give a text prompt, e.g. threedistill generate \"a red cube\"")
    if "\n" in prompt or "\r" in prompt:
        raise UserError("the prompt must be a single line")
    return prompt


def check_writable_location(path: Path) -> None:
    """Fail early, creating nothing, if ``path`` could not be created or written."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output folder '{path}' is not writable ('{probe}' is a file); choose another with --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder '{path}' is not writable (no permission on '{probe}'); choose another with --out")


#: The weight of the newest step in the progress bar's smoothed loss (about the last 20 steps).
LOSS_EMA_WEIGHT = 0.05


def smoothed(ema: Optional[float], value: float, weight: float = LOSS_EMA_WEIGHT) -> float:
    """One step of an exponential moving average (the first value starts it). Score-distillation
    losses swing over orders of magnitude from step to step (the noise level t is random); the
    average shows the trend."""
    return float(value) if ema is None else (1.0 - weight) * ema + weight * float(value)


class _Timer:
    """Wall-clock sections; synchronizes CUDA so GPU time lands in the right section. Not
    ``enabled`` (``run.profile`` off), it times nothing and waits for nothing."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.times: Dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._t
        self._t = now


def read_stats(pending: Sequence[Dict[str, object]]) -> List[Dict[str, float]]:
    """``pending`` steps' stats with every tensor (0-dim, on the device) read as a Python float, in
    one transfer per device: the only wait for the device between two reads (``run.stats_every``)."""
    out: List[Dict[str, float]] = [dict(s) for s in pending]  # type: ignore[arg-type]
    slots: Dict[torch.device, list] = {}
    for i, s in enumerate(pending):
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                slots.setdefault(v.device, []).append((i, k, v))
    for items in slots.values():
        # float64: a float32 value reads exactly as float() would have read it
        values = torch.stack([v.detach().reshape(()).to(torch.float64) for _, _, v in items]).tolist()
        for (i, k, _), x in zip(items, values):
            out[i][k] = x
    return out


def nonfinite_loss_error(stats: Dict[str, float]) -> Optional[UserError]:
    """The run's one-line error when this (read) step's loss is NaN or infinite, else None."""
    if math.isfinite(stats["loss"]):
        return None
    return UserError(f"loss became {stats['loss']} at step {int(stats['step'])}; "
                     f"lower optim.lr or guidance.guidance_scale")


def adam_implementation(setting: str, params: Sequence[torch.Tensor]) -> Dict[str, Optional[bool]]:
    """``optim.fused`` as Adam's ``fused`` / ``foreach`` arguments. "auto": the fused kernel when every
    parameter is a CUDA floating-point tensor, else the multi-tensor ("foreach") one; both compute
    the same update as the per-parameter loop ("loop")."""
    if setting == "auto":
        cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        setting = "fused" if cuda else "foreach"
    if setting == "fused":
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": setting == "foreach"}


def set_adam_implementation(optimizer: torch.optim.Optimizer, flags: Dict[str, Optional[bool]]) -> None:
    """Put ``flags`` (:func:`adam_implementation`) on every group: a loaded checkpoint's groups carry
    the flags they were saved with. The fused kernel wants its step counts on the parameters' device."""
    for g in optimizer.param_groups:
        g.update(flags)
        if flags.get("fused"):
            for p in g["params"]:
                st = optimizer.state.get(p, {})
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# The distiller
# ----------------------------------------------------------------------------------------------
class Distiller:
    """Owns one run: ``Distiller(cfg).run()``; ``Distiller.resume(run_dir).run()`` continues one.

    The prior comes from ``priors`` (a :class:`~threedistill.priors.PriorCache` shared across runs:
    a refine stage, batch rows, web-app jobs; a fresh one when None), unless a loaded ``prior`` is
    passed in. ``run_dir`` (a path or a :class:`~threedistill.runs.RunFolder`) defaults to a new
    folder in ``run.out_dir`` (:meth:`RunFolder.new`).
    """

    def __init__(self, cfg: Config, run_dir: Optional[Union[Path, RunFolder]] = None,
                 callbacks: Sequence[Callback] = (), prior=None, resume: bool = False,
                 priors: Optional[PriorCache] = None):
        self.cfg = cfg
        self.callbacks: List[Callback] = list(callbacks)
        self.cfg.run.prompt = check_prompt(cfg.run.prompt)
        self.device = resolve_device(cfg.run.device)
        if run_dir is None:
            self.folder = RunFolder.new(cfg.run.out_dir, cfg.run.prompt, cfg.run.name)
        else:
            self.folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
        self.run_dir = self.folder.path
        self.resuming = resume
        self.priors = priors if priors is not None else PriorCache()
        self._prior = prior
        #: The representation group to build: ``cfg.representation`` unless the pipeline sets it
        #: to that group with its inputs resolved into files (:func:`threedistill.inputs.resolve_inputs`);
        #: ``cfg`` (written to config.yaml) keeps what the user asked for.
        self.representation_cfg = None
        self._stop = False
        self.step = 0
        self._built = False
        # A checkpoint written by run.checkpoint_every_s off the checkpoint_every cadence: the next
        # checkpoint replaces it (so a long run keeps one such file, not one per interval).
        self._transient_checkpoint: Optional[int] = None
        self._export_stopped = False

    @classmethod
    def resume(cls, run_dir: Union[Path, RunFolder], overrides: Sequence[str] = (), callbacks: Sequence[Callback] = (),
               priors: Optional[PriorCache] = None) -> "Distiller":
        """Continue a run from its folder (its saved config, overridable, e.g. ``run.steps=...``)."""
        folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
        return cls(folder.read_config(overrides), run_dir=folder, callbacks=callbacks, priors=priors, resume=True)

    def request_stop(self) -> None:
        self._stop = True

    # -- building ---------------------------------------------------------------------------------
    def build(self) -> None:
        """Prior, guidance, representation, camera sampler, optimizer (in that order)."""
        if self._built:
            return
        cfg = self.cfg
        # torch's CPU threads (process-wide), chosen before anything heavy runs.
        self.threads, why = choose_threads(cfg.run.threads)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        log.info("torch CPU threads: %d (%s)", self.threads, why)
        # run.threads=auto on the CPU: looked at again every 10 s (other processes may start or end).
        self.thread_governor = ThreadGovernor(cfg.run.threads if self.device.type == "cpu" else 1, self.threads)
        torch.manual_seed(cfg.run.seed)
        if self._prior is None:
            self._prior = self.priors.get(cfg.prior, self.device)
        self.prior = self._prior
        set_tf32(bool(cfg.run.tf32), self.device)
        self.profile = profile_on(cfg.run.profile, self.device)
        self.stats_every = stats_every(cfg.run.stats_every, self.device)
        if hasattr(self.prior, "compile_unet"):  # the prior is shared (PriorCache): set per run
            self.prior.compile_unet(cfg.prior.compile)
        self.guidance = build_guidance(cfg.guidance, self.prior, steps=cfg.run.steps).to(self.device)
        self.guidance.profile = self.profile
        self.guidance.set_prompt(cfg.run.prompt, cfg.prior.negative_prompt, cfg.prior.view_dependent, cfg.camera,
                                 cfg.prior.view_prompt)
        torch.manual_seed(cfg.run.seed)
        rep_cfg = cfg.representation if self.representation_cfg is None else self.representation_cfg
        self.representation = build_representation(rep_cfg, RepresentationContext.of_run(cfg.run), self.device)
        self.sampler = CameraSampler(cfg.camera, cfg.run.resolution)
        groups = self.representation.param_groups(cfg.optim) + self.guidance.param_groups(cfg.optim)
        opt_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
        self.adam_flags = adam_implementation(str(cfg.optim.fused), [p for g in groups for p in g["params"]])
        self.optimizer = opt_cls(groups, lr=scheduled(cfg.optim.lr, 0, "optim.lr"), betas=tuple(cfg.optim.betas),
                                 eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, **self.adam_flags)
        self.set_learning_rates(0)  # per-group rates (lr_scale, or a group's own lr_fixed)
        self._built = True

    def set_learning_rates(self, step: int) -> None:
        lr = scheduled(self.cfg.optim.lr, step, "optim.lr")
        for g in self.optimizer.param_groups:
            if "lr_final" in g:  # a fixed rate decayed exponentially to lr_final at lr_decay_steps
                g["lr"] = exponential_decay(g["lr_fixed"], g["lr_final"], step, g["lr_decay_steps"])
            else:
                g["lr"] = g["lr_fixed"] if "lr_fixed" in g else lr * g["lr_scale"]

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self, step: int, timer: Optional[_Timer] = None) -> Dict[str, float]:
        """One distillation step at ``step`` (0-based); returns its stats read (Python floats). Raises
        the run's :class:`UserError` when the loss is not finite. The loop uses :meth:`step_stats`
        (no wait for the device) and reads every ``run.stats_every`` steps."""
        stats = read_stats([self.step_stats(step, timer)])[0]
        error = nonfinite_loss_error(stats)
        if error is not None:
            raise error
        return stats

    def step_stats(self, step: int, timer: Optional[_Timer] = None) -> Dict[str, object]:
        """One distillation step at ``step`` (0-based); returns its stats unread: Python numbers and
        0-dim tensors on the device (:func:`read_stats`). Nothing here waits for the device (on
        CUDA), unless ``timer`` is enabled (``run.profile``)."""
        timer = timer or _Timer(self.device, enabled=getattr(self, "profile", True))
        cfg = self.cfg
        self.set_learning_rates(step)
        timer.start()
        cameras = self.sampler.sample(step_generator(cfg.run.seed, step, STREAM_CAMERAS), step=step).to(self.device)
        out = self.representation.render(cameras, step=step, generator=step_generator(cfg.run.seed, step, STREAM_RENDER),
                                         training=True)
        timer.lap("render")
        g = self.guidance(out.rgb, cameras, step, generator=step_generator(cfg.run.seed, step, STREAM_GUIDANCE))
        timer.lap("guidance")
        regs = self.representation.regularizers(out, step)
        loss = g.loss + sum(regs.values()) if regs else g.loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.representation.after_backward(out, step)
        timer.lap("backward")
        # per-parameter sums of squares in float32 (as before), summed in float64: a tensor, unread
        squares = [p.grad.detach().pow(2).sum() for grp in self.optimizer.param_groups
                   for p in grp["params"] if p.grad is not None]
        param_norm = torch.stack(squares).to(torch.float64).sum().sqrt() if squares else 0.0
        self.optimizer.step()
        self.representation.update(step, self.optimizer)
        timer.lap("optimizer")
        stats: Dict[str, object] = {
            "step": step + 1,
            "loss": loss.detach(),
            "loss_guidance": g.loss.detach(),
            "param_grad_norm": param_norm,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        for k, v in regs.items():
            stats[f"loss_{k}"] = v.detach() if isinstance(v, torch.Tensor) else float(v)
        stats.update(g.stats)
        stats.update(self.representation.log_stats())
        return stats

    # -- outputs ------------------------------------------------------------------------------------
    @torch.no_grad()
    def save_preview(self, step: int) -> Path:
        c = self.cfg.camera
        size = max(max_resolution(self.cfg.run.resolution), int(self.cfg.run.preview_resolution))
        cams = preview_cameras(size, c.eval_distance, c.eval_fovy, c.eval_elevation).to(self.device)
        out = self.representation.render(cams, step=step, training=False)
        path = self.folder.preview_path(step)
        save_image(image_grid(out.rgb.clamp(0, 1).cpu(), nrow=4), path)
        return path

    def save_checkpoint(self, step: int, transient: bool = False) -> Path:
        """Write the checkpoint of ``step``. A ``transient`` one (time-based, off the
        ``run.checkpoint_every`` cadence) is removed once a newer checkpoint is written."""
        path = save_checkpoint(self.folder.checkpoints_dir, step, self.representation, self.guidance, self.optimizer,
                               extra={"prompt": self.cfg.run.prompt, "seed": self.cfg.run.seed})
        old, self._transient_checkpoint = self._transient_checkpoint, (step if transient else None)
        if old is not None and old != step:
            remove_checkpoint(self.folder.checkpoints_dir, old)
        for cb in self.callbacks:
            cb.on_checkpoint(self, step, path)
        return path

    def _forget_transient_checkpoints(self, loaded: int) -> None:
        """After resuming from ``loaded``: the older checkpoints off the ``run.checkpoint_every``
        cadence (time-based, or written by a stop) are superseded, and so is ``loaded`` itself
        once a newer one is written: the same one-file budget as in an uninterrupted run."""
        every = int(self.cfg.run.checkpoint_every)
        for step in checkpoint_steps(self.folder.checkpoints_dir):
            if step < loaded and step % every != 0:
                remove_checkpoint(self.folder.checkpoints_dir, step)
        self._transient_checkpoint = loaded if loaded % every != 0 else None

    def _write_status(self, status: str, **extra) -> None:
        self.folder.set_status(status, self.cfg.run.prompt, self.step, self.cfg.run.steps, **extra)

    def export(self) -> tuple[Dict[str, str], Optional[str]]:
        """The representation's extra outputs (the Gaussians' splat PLY, with ``export.splat``), turntable video and
        meshes (export.formats) into the run folder: the written outputs, and the one-line reason the mesh could not
        be extracted (else None)."""
        outputs: Dict[str, str] = {}
        error: Optional[str] = None
        e, c = self.cfg.export, self.cfg.camera
        self.representation.eval()
        self._export_stopped = False

        def stopped() -> bool:
            """A stop requested: end before the next output (each one is written atomically)."""
            self._export_stopped = self._export_stopped or self._stop
            return self._export_stopped

        bar = None
        if self.cfg.run.progress:
            from tqdm import tqdm

            # No total (which stages run depends on the representation): the stage's name and the time.
            bar = tqdm(desc="export", unit="stage", dynamic_ncols=True, bar_format="{desc} [{elapsed}]")

        def stage(name: str) -> None:
            """Each export stage as it starts: on the bar, and in the log."""
            log.info("export: %s", name)
            if bar is not None:
                bar.set_description_str(f"export: {name}", refresh=False)
                bar.update(1)

        try:
            # The splat PLY first, then the meshes, then the video (of the mesh file when one was written).
            if e.splat and "splat" in self.representation.extra_outputs() and not stopped():
                stage("splat")
                outputs["splat"] = str(self.representation.write_extra_output("splat", self.folder.splat_path))
            if e.formats and not stopped():
                try:
                    for p in export_run_meshes(self.representation, self.run_dir, list(e.formats), e, stage=stage,
                                                   camera_cfg=self.cfg.camera):
                        outputs[p.suffix.lstrip(".")] = str(p)
                except UserError as err:
                    error = f"{err}; the trained run is kept: retry with `threedistill export {self.run_dir} --threshold X`"
            if e.turntable and not stopped():
                stage("turntable")
                p = render_turntable(self.representation, self.folder.turntable_path, frames=e.turntable_frames,
                                     fps=e.turntable_fps, resolution=e.turntable_resolution,
                                     elevation=e.turntable_elevation, distance=c.eval_distance, fovy=c.eval_fovy,
                                     progress=self.cfg.run.progress, render=self._turntable_renderer(outputs))
                outputs["turntable"] = str(p)
        finally:
            if bar is not None:
                bar.set_description_str("export: done" if error is None else "export: failed", refresh=False)
                bar.update(1)
                bar.close()
        return outputs, error

    def _turntable_renderer(self, outputs: Dict[str, str]):
        """What the turntable shows (``export.turntable_of``): a frame renderer of the written mesh
        file (GLB, else OBJ, else PLY), or None for the representation's own render."""
        of = str(self.cfg.export.turntable_of)
        if of == "auto":
            of = "representation" if self.representation.extra_outputs() else "mesh"
        written = next((outputs[k] for k in ("glb", "obj", "ply") if k in outputs), None)
        if of != "mesh" or written is None:
            return None
        return mesh_frame_renderer(written, self.representation.evaluation_ambient())

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        if not self.resuming and self.folder.config_path.exists():
            raise UserError(f"run folder '{self.run_dir}' already holds a run; resume it with --resume or pick another run.name")
        if self.resuming:
            self.folder.check_not_running()  # another process drives it now: leave it alone
        # Check the output location before the (slow) build, create the run folder only after it,
        # so a bad prior or config leaves nothing behind.
        check_writable_location(self.run_dir)
        self.build()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"output folder '{self.run_dir}' is not writable ({e.strerror or e}); choose another with --out") from None
        start = 0
        if self.resuming:
            for p in self.folder.remove_temp_leftovers():
                log.info("removed the temporary file '%s' a killed write left", p)
            # The newest checkpoint that loads; newer ones that do not are skipped with a warning.
            loaded = load_latest_checkpoint(self.folder.checkpoints_dir, self.representation, self.guidance,
                                            self.optimizer, self.device)
            if loaded is not None:
                start = loaded[0]
                self.representation.set_step(start)
                self._forget_transient_checkpoints(start)
            set_adam_implementation(self.optimizer, self.adam_flags)
        self.step = start
        self.folder.write_config(cfg)
        self.folder.truncate_metrics(start)
        self.folder.previews_dir.mkdir(exist_ok=True)
        # While the loop and the export run, run.json names this process as the runner (with a
        # heartbeat): if the process dies, every front end reads the run as interrupted.
        with self.folder.attend(step=lambda: self.step):
            return self._run_attended(start)

    def _run_attended(self, start: int) -> RunResult:
        cfg = self.cfg
        self._write_status("running")
        ended = False
        try:
            for cb in self.callbacks:
                cb.on_start(self)

            totals: Dict[str, float] = {}
            loss_ema: Optional[float] = None
            t_begin = time.perf_counter()
            bar = None
            if cfg.run.progress:
                from tqdm import tqdm

                bar = tqdm(total=cfg.run.steps, initial=start, desc="distill", unit="step", dynamic_ncols=True)
            status = "finished"
            every_s = float(cfg.run.checkpoint_every_s or 0.0)
            last_checkpoint_t = time.perf_counter()
            # Steps whose stats are not read yet (tensors on the device): read every run.stats_every
            # steps, and always before a preview, a checkpoint, a stop and the end, so a checkpoint
            # never follows a non-finite loss.
            pending: List[Dict[str, object]] = []
            finite = [True]

            def read_pending(metrics) -> None:
                nonlocal loss_ema
                lines, batch = read_stats(pending), len(pending)
                pending.clear()
                try:
                    for stats in lines:
                        error = nonfinite_loss_error(stats)
                        if error is not None:
                            finite[0] = False
                            self.step = int(stats["step"]) - 1  # the last step with a finite loss
                            raise error
                        metrics.write(json.dumps(stats) + "\n")
                        loss_ema = smoothed(loss_ema, stats["loss"])
                        for cb in self.callbacks:
                            cb.on_step(self, int(stats["step"]), stats)
                finally:
                    metrics.flush()
                if bar is not None and lines:
                    last = lines[-1]
                    bar.set_postfix(loss=f"{last['loss']:.3g}", loss_ema=f"{loss_ema:.3g}", t=int(last["t"]),
                                    **self.representation.progress_stats(), refresh=False)
                    bar.update(batch)

            try:
                with open(self.folder.metrics_path, "a", encoding="utf-8") as metrics:
                    try:
                        for step in range(start, cfg.run.steps):
                            timer = _Timer(self.device, enabled=self.profile)
                            t0 = time.perf_counter()
                            stats = self.step_stats(step, timer)
                            stats.update({f"time_{k}": v for k, v in timer.times.items()})
                            stats["time_step"] = time.perf_counter() - t0
                            for k, v in timer.times.items():
                                totals[k] = totals.get(k, 0.0) + v
                            self.step = step + 1
                            pending.append(stats)
                            changed = self.thread_governor.tick()
                            if changed is not None:
                                log.info("torch CPU threads: %d (the load of other processes changed)", changed)
                            preview = self.step % cfg.run.preview_every == 0 or self.step == cfg.run.steps
                            checkpoint = self.step != cfg.run.steps and (
                                self.step % cfg.run.checkpoint_every == 0
                                or (every_s > 0 and time.perf_counter() - last_checkpoint_t >= every_s))
                            if len(pending) >= self.stats_every or preview or checkpoint or self._stop:
                                read_pending(metrics)
                            if preview:
                                p = self.save_preview(self.step)
                                for cb in self.callbacks:
                                    cb.on_preview(self, self.step, p)
                            if self.step != cfg.run.steps:
                                if self.step % cfg.run.checkpoint_every == 0:
                                    self.save_checkpoint(self.step)
                                    last_checkpoint_t = time.perf_counter()
                                elif checkpoint and not self._stop:
                                    self.save_checkpoint(self.step, transient=True)
                                    last_checkpoint_t = time.perf_counter()
                            if self._stop:
                                status = "stopped"
                                break
                    except BaseException:
                        if pending and finite[0]:
                            # the steps run before the error keep their metrics lines (a non-finite
                            # loss among them ends the run at the last finite step)
                            try:
                                read_pending(metrics)
                            except UserError:
                                pass
                        raise
            except KeyboardInterrupt:
                if self.step > start and finite[0]:
                    self.save_checkpoint(self.step)
                self._write_status("interrupted")
                ended = True
                raise
            finally:
                if bar is not None:
                    bar.close()
            self.save_checkpoint(self.step)
            timings = {f"{k}_s": round(v, 3) for k, v in totals.items()}
            timings["train_s"] = round(time.perf_counter() - t_begin, 3)
            outputs: Dict[str, str] = {}
            export_error: Optional[str] = None
            if status == "finished":
                t_exp = time.perf_counter()
                self._write_status("exporting", timings=timings)
                outputs, export_error = self.export()
                timings["export_s"] = round(time.perf_counter() - t_exp, 3)
            extra: Dict[str, object] = {"export_error": export_error} if export_error else {}
            if status == "finished" and self._export_stopped:
                # Stopped during the export: trained to the end (checkpointed), outputs not all written.
                # Resuming the run (no steps left) writes them.
                status, export_error = "stopped", None
            if status == "stopped" and self.step >= cfg.run.steps:
                extra = {"export_pending": True}
            self._write_status(status, timings=timings, outputs=outputs, **extra)
            ended = True
        except BaseException as e:
            if not ended:  # an error ended the run: it is not running any more (resumable from its checkpoint)
                line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                error = line if isinstance(e, UserError) else f"{type(e).__name__}: {line}" if line else type(e).__name__
                try:
                    self._write_status("interrupted", error=error)
                except Exception:  # noqa: BLE001 - the run's own error matters more
                    log.warning("could not write the status of '%s'", self.run_dir)
            raise
        result = RunResult(run_dir=self.run_dir, status=status, step=self.step, outputs=outputs, timings=timings)
        for cb in self.callbacks:
            cb.on_end(self, result)
        if export_error:
            raise UserError(export_error)
        return result
