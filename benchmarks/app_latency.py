"""Web app latency as a user sees it: from clicking Generate to the first preview image shown, and to
the GLB shown in the 3D viewer, through a real browser (headless Chromium driven by Playwright).

    OMP_NUM_THREADS=1 python benchmarks/app_latency.py [--steps 800] [--preset sds-nerf] [--prior shapes]
        [--resolution PX] [--advanced "run.preview_every=50"] [--runs 1] [--out FILE.md]

Defaults: the default preset (``sds-nerf``), its own steps (800) and settings, the built-in
``shapes`` prior: the page's form with only the prompt ("a red cube") filled in. ``--steps``
shortens the run (the preset's ``run.preview_every`` is 100, so a run shorter than that shows its
first preview only at its end: add ``--advanced run.preview_every=N`` to see one earlier).

The app is served in-process on a free localhost port with a fresh outputs folder (a temporary one
unless ``--outputs``); the browser is Debian's Chromium (``apt-get install chromium``, at
``/usr/bin/chromium``; ``pip install playwright``, no ``playwright install``). Each run opens a fresh
page, fills the form and clicks Generate; t = 0 is just before the click. The page is read every
0.1 s:

* **preview shown**: the "Latest preview" image has a source;
* **GLB in page**: the 3D viewer has its canvas (the results arrived);
* **GLB drawn**: the viewer's canvas shows something other than its background (Babylon.js loads
  and draws the GLB after the canvas appears);

and, on the server side (the JobManager, polled every 0.05 s from a thread), when the job started,
when its first preview was written and when it finished (export included). The page polls the
server every 2 s (``POLL_SECONDS``), so "shown" trails "written" by up to ~2 s plus the browser's
work. The table (markdown) is printed and, with ``--out``, written to that file.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM = os.environ.get("THREEDISTILL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a red cube"

# one JS call: which of the things we wait for are on the page
STATE_JS = """() => ({
  preview: !!document.querySelector('#preview img[src]'),
  glb: !!document.querySelector('#result-glb canvas'),
  finished: (document.querySelector('#progress') || {innerText: ''}).innerText.includes('finished'),
  failed: (document.querySelector('#progress') || {innerText: ''}).innerText.includes('failed'),
})"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drawn(locator) -> bool:
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("L"), dtype=np.int16)
    return bool((np.abs(img - np.median(img)) > 24).mean() > 0.01)


class ServerWatch(threading.Thread):
    """Polls the manager for the newest job: start, first preview written, end."""

    def __init__(self, manager, t0_ref):
        super().__init__(daemon=True)
        self.manager, self.t0_ref = manager, t0_ref
        self.started = self.preview = self.ended = None
        self.status = None
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            jobs = self.manager.jobs()
            if jobs:
                j, now = jobs[-1], time.monotonic() - self.t0_ref[0]
                if self.started is None and j["status"] != "queued":
                    self.started = now
                if self.preview is None and j["preview"]:
                    self.preview = now
                if j["status"] not in ("queued", "running"):
                    self.ended, self.status = now, j["status"]
                    return
            time.sleep(0.05)


def one_run(ctx, url, manager, args, timeout_s: float) -> dict:
    page = ctx.new_page()
    try:
        page.goto(url)
        page.get_by_role("button", name="Generate").wait_for()
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        if args.preset != "sds-nerf":  # the page's default
            page.get_by_label("Preset (loss - representation)").fill(args.preset)
            page.keyboard.press("Enter")
        if args.prior != "shapes":
            page.get_by_label("Prior (built-in, cached pipeline, or a typed path / hub id)").fill(args.prior)
            page.keyboard.press("Enter")
        if args.steps:
            page.get_by_label("Steps (blank: preset)").fill(str(args.steps))
        if args.resolution:
            page.get_by_label("Render resolution (blank: preset)").fill(str(args.resolution))
        if args.advanced:
            page.get_by_text("Advanced (config overrides)").click()
            page.locator(".cm-content").first.click()
            page.keyboard.press("Control+A")
            page.keyboard.press("Delete")
            page.keyboard.insert_text("\n".join(args.advanced))
        n_jobs = len(manager.jobs())
        t0 = [0.0]
        watch = ServerWatch(manager, t0)
        button = page.get_by_role("button", name="Generate")
        t0[0] = time.monotonic()
        button.click()
        watch.start()
        out = {"preview_shown": None, "glb_in_page": None, "glb_drawn": None}
        end = t0[0] + timeout_s
        while time.monotonic() < end:
            st = page.evaluate(STATE_JS)
            now = time.monotonic() - t0[0]
            if st["preview"] and out["preview_shown"] is None:
                out["preview_shown"] = now
            if st["glb"] and out["glb_in_page"] is None:
                out["glb_in_page"] = now
            if out["glb_in_page"] is not None:
                if drawn(page.locator("#result-glb canvas")):
                    out["glb_drawn"] = time.monotonic() - t0[0]
                    break
            if st["failed"]:
                raise SystemExit(f"the job failed: {page.locator('#progress').inner_text()}")
            time.sleep(0.1)
        else:
            raise SystemExit(f"timed out after {timeout_s:.0f} s: {out}")
        watch.join(timeout=5)
        if len(manager.jobs()) != n_jobs + 1:
            raise SystemExit("the click did not queue exactly one job (a field error on the page?)")
        job = manager.jobs()[-1]
        out.update(server_started=watch.started, server_preview=watch.preview, server_finished=watch.ended,
                   steps=job["steps"], status=watch.status)
        return out
    finally:
        page.close()


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps (default: the preset's, 800 for sds-nerf)")
    p.add_argument("--preset", default="sds-nerf")
    p.add_argument("--prior", default="shapes")
    p.add_argument("--resolution", type=int, default=None, help="render resolution (default: the preset's)")
    p.add_argument("--advanced", nargs="*", default=[], help="key=value overrides for the Advanced box")
    p.add_argument("--runs", type=int, default=1, help="runs, one after another (medians reported)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per run before giving up")
    p.add_argument("--outputs", default=None, help="outputs folder (default: a temporary one, removed)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("needs the Python package playwright (pip install playwright)", file=sys.stderr)
        return 2
    if not os.access(CHROMIUM, os.X_OK):
        print(f"needs Chromium at {CHROMIUM} (apt-get install -y chromium)", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from threedistill.app.jobs import JobManager
    from threedistill.app.ui import POLL_SECONDS, launch

    outputs = Path(args.outputs) if args.outputs else Path(tempfile.mkdtemp(prefix="app-latency-"))
    profile = tempfile.mkdtemp(prefix="app-latency-chromium-")
    manager = JobManager(outputs)
    demo, _, url = launch("127.0.0.1", free_port(), manager=manager, prevent_thread_lock=True, quiet=True)
    rows = []
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000})
            ctx.set_default_timeout(60_000)
            try:
                for i in range(args.runs):
                    r = one_run(ctx, url, manager, args, args.timeout)
                    rows.append(r)
                    print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}"
                                                                   for k, v in r.items()), flush=True)
            finally:
                ctx.close()
    finally:
        demo.close()
        manager.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
        if not args.outputs:
            shutil.rmtree(outputs, ignore_errors=True)

    def med(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.median(vals) if vals else None

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = " ".join(args.advanced) or "none"
    lines = [
        f"App latency, click Generate -> shown in headless Chromium (seconds, median of {len(rows)} run(s)); "
        f"preset `{args.preset}`, prior `{args.prior}`, steps {rows[0]['steps']}, resolution "
        f"{args.resolution or 'preset'}, advanced: `{extra}`; device {device}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"page poll {POLL_SECONDS:g} s.",
        "",
        "| what | seconds after the click |",
        "|---|---:|",
        f"| server: job started | {fmt(med('server_started'))} |",
        f"| server: first preview written | {fmt(med('server_preview'))} |",
        f"| **page: first preview shown** | **{fmt(med('preview_shown'))}** |",
        f"| server: job finished (export done) | {fmt(med('server_finished'))} |",
        f"| page: GLB viewer in the page | {fmt(med('glb_in_page'))} |",
        f"| **page: GLB drawn in the viewer** | **{fmt(med('glb_drawn'))}** |",
    ]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
