"""The Gradio page over :class:`~threedistill.app.jobs.JobManager`, and its launcher.

    python app.py [--host 127.0.0.1] [--port 7860] [--outputs outputs] [--auth USER:PASSWORD] [--insecure]
    threedistill app [--host ...] [--port ...] [--out ...] [--auth USER:PASSWORD] [--insecure]

Bound to another address than loopback, the app refuses to start without a login (``--auth``, or
the ``THREEDISTILL_AUTH`` environment variable, so the password need not be on the command line)
unless ``--insecure`` says so. Gradio's upload route is closed: the page takes no files.

The page polls the manager every two seconds (a ``gr.Timer``), so a reloaded or reopened page
shows the running job. Named API endpoints (``/submit``, ``/status``, ``/cancel``, ``/outputs``,
``/history``, ``/resume``, ``/preview``, ``/curves``) let ``gradio_client`` drive the same manager.

Preview samples the form's prior for the form's prompt per view suffix at the form's guidance
scale (the 2D prompt check, :mod:`threedistill.preview`) without queueing a job; the live curves
(:mod:`threedistill.plots`) follow the running job on the same poll, and the result panel shows the
curves of the run it shows (a finished job or a run picked in History).
"""

import argparse
import html
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from threedistill.app.jobs import (ACTIVE, FIELDS, JobManager, ValidationError,
                                   list_presets)
from threedistill.errors import UserError
from threedistill.preview import DEFAULT_SAMPLES, DEFAULT_STEPS, preview_image
from threedistill.text import format_duration

POLL_SECONDS = 2.0
#: The live curves' poll: a running job's curves are drawn again this often (a figure costs a
#: fraction of a second of CPU, taken from the running job).
CURVES_EVERY_S = 6.0
#: The Preview button's grid: samples per view and DDIM steps (threedistill preview's defaults).
PREVIEW_SAMPLES, PREVIEW_STEPS = DEFAULT_SAMPLES, DEFAULT_STEPS
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: The environment variable holding ``USER:PASSWORD`` when ``--auth`` is not given.
AUTH_ENV = "THREEDISTILL_AUTH"
OVERRIDES_HELP = ("# YAML or key=value lines, applied after the preset and the fields above, e.g.\n"
                  "# run.preview_every=50\n# export.formats=[glb,obj,ply]\n")


def _progress_html(job: Optional[Dict[str, Any]]) -> str:
    if job is None:
        return "<p>No job yet: enter a prompt and press Generate.</p>"
    st = job["status"]
    head = f"<b>{html.escape(job['settings']['prompt'])}</b> &mdash; {st}"
    warned = "".join(f"<p class='job-warning' style='color:#b45309'>⚠ {html.escape(w)}</p>"
                     for w in job.get("warnings") or ())
    return _job_html(job, st, head) + warned


def _job_html(job: Dict[str, Any], st: str, head: str) -> str:
    if st == "queued":
        return f"<p>{head}: position {job['position']} in the queue</p>"
    if st == "running":
        loss = f"{job['loss']:.4g}" if job["loss"] is not None else "?"
        phase = job["phase"]
        eta = format_duration(job["eta_s"])
        return (f"<p>{head} ({phase})</p><progress value='{job['step']}' max='{max(job['steps'], 1)}' "
                f"style='width:100%'></progress><p>step {job['step']} / {job['steps']} &middot; loss {loss} "
                f"&middot; time left {eta}</p>")
    if st == "failed":
        return f"<p>{head}: <span style='color:#c00'>{html.escape(job['error'] or '')}</span></p>"
    run = f" &middot; {html.escape(job['run_name'])}" if job.get("run_name") else ""
    note = ""
    if st == "stopped" and job.get("run_name"):
        note = (" &middot; stopped during the export, its outputs are not all written: Resume it (History) to write them"
                if job.get("export_pending") else " &middot; Resume it (History) to continue from its checkpoint")
    return f"<p>{head} at step {job['step']} / {job['steps']}{run}{note}</p>"


def front_view(preview: str):
    """The first (front) view of a preview strip (views side by side, each as tall as the strip):
    a history thumbnail that shows the object instead of the whole strip squeezed into a square."""
    from PIL import Image

    with Image.open(preview) as im:
        h = im.height
        return im.crop((0, 0, min(h, im.width), h)).convert("RGB")


def _jobs_table(manager: JobManager) -> List[List[Any]]:
    rows = []
    for j in manager.jobs():
        where = f"#{j['position']} in queue" if j["status"] == "queued" else f"{j['step']}/{j['steps']}"
        rows.append([j["id"], j["settings"]["prompt"], j["settings"]["preset"], j["status"], where])
    return rows


def build_ui(manager: JobManager):
    import gradio as gr

    presets = list_presets()
    with gr.Blocks(title="threedistill", analytics_enabled=False) as demo:
        gr.Markdown("# threedistill\nText to 3D by score distillation. Jobs run on the server, one per device at a "
                    f"time; outputs go to `{manager.outputs}`.")
        job_id = gr.State(None)      # the job this page follows
        # the finished run the page last showed on its own (so the viewer is loaded once, and a run picked
        # in History is not replaced by it at the next poll: picking does not change this)
        shown = gr.State(None)
        errors: Dict[str, Any] = {}

        def err_box(name: str):
            errors[name] = gr.Markdown(visible=False, elem_classes=["field-error"], elem_id=f"error-{name}")

        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="a red cube", lines=1)
                err_box("prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                err_box("negative_prompt")
                with gr.Row():
                    preset = gr.Dropdown(presets, value="sds-nerf" if "sds-nerf" in presets else presets[0],
                                         label="Preset (loss - representation)")
                    prior = gr.Dropdown(manager.priors, value="shapes", allow_custom_value=True,
                                        label="Prior (built-in, cached pipeline, or a typed path / hub id)")
                err_box("preset")
                err_box("prior")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    # Textboxes, not gr.Number: a Number box shows and sends 0 for "no value", which the
                    # server rightly rejects ("steps must be > 0"), so "blank: preset" could not be left blank.
                    steps = gr.Textbox(value="", placeholder="preset", label="Steps (blank: preset)", lines=1)
                    scale = gr.Textbox(value="", placeholder="preset", label="Guidance scale (blank: preset)", lines=1)
                    resolution = gr.Textbox(value="", placeholder="preset", label="Render resolution (blank: preset)",
                                            lines=1)
                for name in ("seed", "steps", "guidance_scale", "resolution"):
                    err_box(name)
                with gr.Accordion("Advanced (config overrides)", open=False):
                    overrides = gr.Code(value=OVERRIDES_HELP, language="yaml", label="YAML or key=value lines")
                    err_box("overrides")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary")
                    preview_btn = gr.Button("Preview", elem_id="preview-button")
                    cancel = gr.Button("Cancel", variant="stop")
                prompt_check = gr.Image(label="Preview: the prior's 2D samples per view (rows) at this guidance scale",
                                        type="pil", interactive=False, elem_id="prompt-preview", height=470,
                                        show_label=False)  # the grid has its own title line
                prompt_check_msg = gr.Markdown("", elem_id="prompt-preview-message")
            with gr.Column(scale=1):
                progress = gr.HTML(_progress_html(None), elem_id="progress")
                preview = gr.Image(label="Latest preview", type="filepath", interactive=False, elem_id="preview",
                                   height=280)
                live_curves = gr.Image(label="Live curves (running job)", type="filepath", interactive=False,
                                       elem_id="live-curves", height=440)
                jobs = gr.Dataframe(headers=["job", "prompt", "preset", "status", "progress"], label="Jobs on this server",
                                    interactive=False, value=_jobs_table(manager))
        gr.Markdown("## Result")
        result_title = gr.Markdown("", elem_id="result-title")
        with gr.Row():
            model = gr.Model3D(label="Mesh (GLB)", height=360, elem_id="result-glb")
            splat = gr.Model3D(label="Gaussians (splat PLY)", height=360, visible=False)
            video = gr.Video(label="Turntable", height=360, elem_id="result-video")
        result_curves = gr.Image(label="Curves", type="filepath", interactive=False, elem_id="result-curves",
                                 height=560)
        downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
        with gr.Accordion("Config used", open=False):
            config_used = gr.Code(language="yaml", interactive=False)
        gr.Markdown("## History")
        with gr.Row():
            history_pick = gr.Dropdown(choices=[], label="Past runs (outputs folder)", allow_custom_value=False, scale=3)
            refresh = gr.Button("Refresh", scale=1)
            resume = gr.Button("Resume", scale=1, elem_id="resume")
        resume_msg = gr.Markdown("", elem_id="resume-msg")
        gallery = gr.Gallery(label="History", columns=6, height=220, allow_preview=False, object_fit="contain")
        run_ref = gr.Textbox(visible=False)  # a job id or run name: the /outputs endpoint's input
        curves_ref = gr.Textbox(visible=False)  # a job id or run name: the /curves endpoint's input

        # -- handlers ---------------------------------------------------------------------------
        def results(ref: Optional[str]):
            """(title, glb, splat, video, downloads, config) of a run, by job id or run name."""
            if not ref:
                return "", None, gr.update(value=None, visible=False), None, None, "", None
            try:
                o = manager.run_outputs(ref)
            except UserError as e:
                return f"*{e}*", None, gr.update(value=None, visible=False), None, None, "", None
            files = [o[k] for k in ("glb", "obj", "ply", "splat", "config", "zip") if o.get(k)]
            cfg_text = Path(o["config"]).read_text(encoding="utf-8") if o.get("config") else ""
            return (f"`{Path(o['run_dir']).name}`", o["glb"], gr.update(value=o["splat"], visible=bool(o["splat"])),
                    o["turntable"], files, cfg_text, curves_of(ref))

        def curves_of(ref: Optional[str], min_age_s: float = 0.0) -> Optional[str]:
            try:
                return manager.curves(ref, min_age_s) if ref else None
            except UserError:
                return None

        result_outputs = [result_title, model, splat, video, downloads, config_used, result_curves]

        def history_update():
            runs = manager.history()
            items = [(front_view(r["preview"]), f"{r['prompt']} ({r['status']})") for r in runs if r["preview"]]
            choices = [(f"{r['name']} — {r['status']}", r["name"]) for r in runs]
            return gr.update(value=items), gr.update(choices=choices)

        def on_submit(*values):
            settings = dict(zip(FIELDS, values))
            if isinstance(settings.get("overrides"), str) and settings["overrides"].strip() == OVERRIDES_HELP.strip():
                settings["overrides"] = ""
            hidden = {name: gr.update(value="", visible=False) for name in FIELDS}
            try:
                jid = manager.submit(settings)
            except ValidationError as e:
                hidden[e.field] = gr.update(value=f"<span style='color:#c00'>⚠ {html.escape(e.message)}</span>",
                                            visible=True)
                return [gr.skip(), gr.skip()] + [hidden[n] for n in FIELDS]
            except UserError as e:
                hidden["overrides"] = gr.update(value=f"⚠ {e}", visible=True)
                return [gr.skip(), gr.skip()] + [hidden[n] for n in FIELDS]
            return [jid, _progress_html(manager.status(jid))] + [hidden[n] for n in FIELDS]

        generate.click(on_submit, inputs=[prompt, negative, preset, prior, seed, steps, scale, resolution, overrides],
                       outputs=[job_id, progress] + [errors[n] for n in FIELDS], api_visibility="private")

        def on_cancel(jid):
            if jid:
                try:
                    manager.cancel(jid)
                except UserError:
                    pass
            return _progress_html(manager.status(jid)) if jid else _progress_html(None)

        cancel.click(on_cancel, inputs=[job_id], outputs=[progress], api_visibility="private")

        def on_preview(*values):
            """The 2D prompt check of the form's settings: (grid image, message)."""
            settings = dict(zip(FIELDS, values))
            if isinstance(settings.get("overrides"), str) and settings["overrides"].strip() == OVERRIDES_HELP.strip():
                settings["overrides"] = ""
            try:
                pv = manager.preview(settings, samples=PREVIEW_SAMPLES, steps=PREVIEW_STEPS)
            except ValidationError as e:
                return None, f"⚠ {e.field.replace('_', ' ')}: {e.message}"
            except UserError as e:
                return None, f"⚠ {e}"
            rows = ", ".join(f"*{p}*" for p in pv.prompts)
            return preview_image(pv), (f"{rows}: {pv.images.shape[1]} samples each, prior `{pv.prior}`, "
                                       f"CFG {pv.guidance_scale:g}, {pv.steps} DDIM steps")

        preview_btn.click(on_preview, inputs=[prompt, negative, preset, prior, seed, steps, scale, resolution, overrides],
                          outputs=[prompt_check, prompt_check_msg], api_name="preview")

        def followed(jid):
            """The job the page follows: ``jid`` while it exists, else the active job (or None)."""
            job = None
            if jid:
                try:
                    job = manager.status(jid)
                except UserError:
                    job = None
            return job or manager.active_job()

        def tick(jid, shown_ref):
            job = followed(jid)
            jid = job["id"] if job else None
            prev = job["preview"] if job and job["preview"] else None
            out = [jid, _progress_html(job), prev if prev else gr.skip(), _jobs_table(manager)]
            ref = job["run_name"] if job and job["status"] not in ACTIVE and job.get("run_name") else None
            if ref and ref != shown_ref:  # a run just ended (or a fresh page): show it, and list it in History
                return out + [ref] + list(results(ref)) + list(history_update())
            return out + [shown_ref] + [gr.skip()] * (len(result_outputs) + 2)

        timer = gr.Timer(POLL_SECONDS)
        tick_outputs = [job_id, progress, preview, jobs, shown] + result_outputs + [gallery, history_pick]
        timer.tick(tick, inputs=[job_id, shown], outputs=tick_outputs, api_visibility="private", show_progress="hidden")
        demo.load(tick, inputs=[job_id, shown], outputs=tick_outputs, api_visibility="private")
        demo.load(history_update, outputs=[gallery, history_pick], api_visibility="private")
        refresh.click(history_update, outputs=[gallery, history_pick], api_visibility="private")

        def live_tick(jid):
            """The followed job's curves (as ``tick`` picks the job), drawn again when it logged steps."""
            job = followed(jid)
            live = curves_of(job["id"], CURVES_EVERY_S - 1) if job and job.get("run_dir") else None
            return live or gr.skip()

        # its own, slower timer: drawing a figure must not hold up the progress poll
        curves_timer = gr.Timer(CURVES_EVERY_S)
        curves_timer.tick(live_tick, inputs=[job_id], outputs=[live_curves], api_visibility="private",
                          show_progress="hidden")
        demo.load(live_tick, inputs=[job_id], outputs=[live_curves], api_visibility="private")

        def pick(name):
            return list(results(name))

        history_pick.input(pick, inputs=[history_pick], outputs=result_outputs, api_visibility="private")

        def on_resume(name):
            """Queue the picked run (stopped or interrupted) to continue from its checkpoint; the page follows it."""
            if not name:
                return gr.skip(), gr.skip(), "*Pick a stopped or interrupted run in the list first.*"
            try:
                jid = manager.resume(name)
            except UserError as e:
                return gr.skip(), gr.skip(), f"*{html.escape(str(e))}*"
            return jid, _progress_html(manager.status(jid)), f"Resuming `{name}`."

        resume.click(on_resume, inputs=[history_pick], outputs=[job_id, progress, resume_msg], api_visibility="private")

        def gallery_select(evt: gr.SelectData):
            runs = [r for r in manager.history() if r["preview"]]
            name = runs[evt.index]["name"] if evt.index is not None and evt.index < len(runs) else None
            return list(results(name))

        gallery.select(gallery_select, outputs=result_outputs, api_visibility="private")

        # -- named API endpoints (gradio_client) -----------------------------------------------------
        run_ref.submit(results, inputs=[run_ref], outputs=result_outputs, api_name="outputs")
        curves_ref.submit(curves_of, inputs=[curves_ref], outputs=[result_curves], api_name="curves")

        def submit(prompt: str, negative_prompt: str = "", preset: str = "sds-nerf", prior: str = "shapes",
                   seed: Optional[float] = None, steps: Optional[float] = None, guidance_scale: Optional[float] = None,
                   resolution: Optional[float] = None, overrides: str = "") -> dict:
            """Queue a job. Returns {"ok": true, "job_id": ...} or {"ok": false, "field": ..., "error": ...}."""
            try:
                jid = manager.submit(dict(zip(FIELDS, (prompt, negative_prompt, preset, prior, seed, steps,
                                                       guidance_scale, resolution, overrides))))
            except ValidationError as e:
                return {"ok": False, "field": e.field, "error": e.message}
            except UserError as e:
                return {"ok": False, "field": None, "error": str(e)}
            return {"ok": True, "job_id": jid}

        def status(job_id: str) -> dict:
            """A job's state: status, position, step, steps, loss, eta_s, preview, outputs, error, run_name."""
            try:
                j = manager.status(job_id)
            except UserError as e:
                return {"ok": False, "error": str(e)}
            j.pop("settings", None)
            return {"ok": True, **j}

        def cancel_job(job_id: str) -> dict:
            """Remove a queued job or stop a running one after its current step."""
            try:
                return {"ok": True, "status": manager.cancel(job_id)}
            except UserError as e:
                return {"ok": False, "error": str(e)}

        def history() -> list:
            """Run folders in the outputs folder, newest first."""
            return [{k: r[k] for k in ("name", "status", "prompt", "step", "steps", "updated", "export_pending")}
                    for r in manager.history()]

        def resume_run(name: str) -> dict:
            """Continue a stopped or interrupted run (by run name) from its newest checkpoint."""
            try:
                return {"ok": True, "job_id": manager.resume(name)}
            except UserError as e:
                return {"ok": False, "error": str(e)}

        gr.api(submit, api_name="submit")
        gr.api(status, api_name="status")
        gr.api(cancel_job, api_name="cancel")
        gr.api(history, api_name="history")
        gr.api(resume_run, api_name="resume")
    return demo


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def parse_auth(text: Optional[str], source: str = "--auth") -> Optional[Tuple[str, str]]:
    """``USER:PASSWORD`` as ``(user, password)`` (the password may hold ':'); None for no text."""
    if text is None or not str(text).strip():
        return None
    user, sep, password = str(text).partition(":")
    if not sep or not user.strip() or not password:
        raise UserError(f"{source} must be USER:PASSWORD with a user name and a password, e.g. {source}=alice:s3cret")
    return user.strip(), password


def resolve_auth(arg: Optional[str]) -> Optional[Tuple[str, str]]:
    """The login from ``--auth``, else from the ``THREEDISTILL_AUTH`` environment variable."""
    if arg is not None and str(arg).strip():
        return parse_auth(arg, "--auth")
    return parse_auth(os.environ.get(AUTH_ENV), AUTH_ENV)


def check_exposure(host: str, auth: Optional[Tuple[str, str]], insecure: bool) -> None:
    """Refuse a bind other machines can reach without a login, unless ``insecure`` says so."""
    if auth is None and not insecure and not is_loopback(host):
        raise UserError(f"serving on {host} lets other machines start jobs and read the outputs: give a login with "
                        f"--auth USER:PASSWORD (or {AUTH_ENV}=USER:PASSWORD), or pass --insecure to serve without one")


class _NoUploads:
    """ASGI middleware: Gradio's upload route answers 403 and stores nothing (the page takes no
    files; ``max_file_size=0`` is the second fence)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and str(scope.get("path", "")).rstrip("/").endswith("/upload"):
            message = {"more_body": True}
            while message.get("more_body"):  # read and drop the body, so the client gets the answer
                message = await receive()
                if message.get("type") != "http.request":
                    return
            body = b"uploads are off: this app takes no files\n"
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def launch(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, outputs: str | Path = "outputs",
           prevent_thread_lock: bool = False, quiet: bool = False, manager: Optional[JobManager] = None,
           auth: Optional[Tuple[str, str]] = None, insecure: bool = False):
    """Build the page and serve it; returns ``(demo, manager, url)``. Blocks unless ``prevent_thread_lock``.

    ``auth``: ``(user, password)`` every request must log in with (Gradio's login page and its
    API's login); required when ``host`` is not a loopback address, unless ``insecure``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_exposure(host, auth, insecure)  # before the manager resumes anything
    manager = manager or JobManager(outputs)
    if not is_loopback(host) and auth is None:
        print(f"WARNING: serving on {host}:{port} without a login (--insecure): anyone who can reach it can start "
              f"jobs and read every file in {manager.outputs}.", file=sys.stderr, flush=True)
    from starlette.middleware import Middleware

    demo = build_ui(manager)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name=host, server_port=port, allowed_paths=[str(manager.outputs)],
                            prevent_thread_lock=prevent_thread_lock, quiet=quiet, share=False, show_error=True,
                            ssr_mode=False, auth=[tuple(auth)] if auth else None, max_file_size=0,
                            app_kwargs={"middleware": [Middleware(_NoUploads)]})
    if not prevent_thread_lock:
        # Ctrl+C closed the server: stop the running job at its next step with a checkpoint; the
        # saved queue keeps it and the waiting ones for the next start.
        print("stopping the running job (it resumes when the app starts again)...", file=sys.stderr, flush=True)
        manager.shutdown()
    return demo, manager, url


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--outputs", "--out", "-o", dest="outputs", default="outputs",
                   help="outputs folder: runs are written and read here, and nowhere else (default outputs)")
    add_auth_args(p)


def add_auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auth", metavar="USER:PASSWORD", default=None,
                   help=f"require this login (default: ${AUTH_ENV} when set); needed to bind a non-loopback address")
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback address without a login (anyone who reaches it can use it)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="app.py", description="threedistill web app")
    add_launch_args(p)
    args = p.parse_args(argv)
    try:
        if not 0 < args.port < 65536:
            raise UserError(f"--port must be in 1..65535, got {args.port}")
        launch(args.host, args.port, args.outputs, auth=resolve_auth(args.auth), insecure=args.insecure)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
