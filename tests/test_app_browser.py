"""The web app in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Types a prompt and tiny settings into the page's own inputs, clicks Generate, waits for the run,
and checks that the 3D viewer, the turntable video and the download links appear (and that the GLB
link downloads a mesh trimesh can load), and that a run picked in History stays shown; a bad input
shows its message next to its field. Saves a full-page screenshot to ``$THREEDISTILL_TEST_ARTIFACTS``
(default ``test-artifacts/``).

Needs ``pip install playwright`` and ``apt-get install chromium`` (no ``playwright install``: the
browser is Debian's, at /usr/bin/chromium). Skipped when either is missing, except under ``CI``,
where a missing browser is a failure, so CI cannot skip it silently.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_app_browser.py
"""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("THREEDISTILL_CHROMIUM", "/usr/bin/chromium")
#: As root, in a sandbox with no network: no sandbox, no GPU, no background connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADVANCED = ("run.preview_every=2\nexport.mesh_resolution=24\nexport.turntable_frames=4\n"
            "export.turntable_resolution=32\ncamera.batch_size=1")
QUICK_API = "run.steps=6\nrun.resolution=16\n" + ADVANCED
TIMEOUT_MS = 90_000  # the run itself (6 steps, tiny export) takes ~5-15 s on 2 CPU cores
#: Steps of the jobs a test stops itself: more than any machine runs before the page's 2 s poll
#: sees them running (a 400-step job at 16 px could finish unseen on a fast, idle machine).
LONG_STEPS = 20_000


def _missing_or_skip():
    """Skip (or, under CI, fail) when Playwright or the browser is not installed."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the Python package 'playwright' is not installed (pip install playwright)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    if problems:
        msg = "browser test: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(msg)


def artifacts_dir() -> Path:
    d = Path(os.environ.get("THREEDISTILL_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, manager) of the app served in-process on a free localhost port."""
    _missing_or_skip()
    pytest.importorskip("gradio")
    from threedistill.app.jobs import JobManager
    from threedistill.app.ui import launch

    manager = JobManager(tmp_path_factory.mktemp("browser-outputs"))
    demo, _, url = launch("127.0.0.1", _free_port(), manager=manager, prevent_thread_lock=True, quiet=True)
    try:
        yield url, manager
    finally:
        demo.close()
        manager.shutdown()


@pytest.fixture(scope="module")
def browser():
    """A persistent Chromium context on a fresh, empty profile (Playwright wants the profile folder
    as an argument, not as --user-data-dir)."""
    _missing_or_skip()
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="threedistill-chromium-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, accept_downloads=True,
                                                       viewport={"width": 1280, "height": 1000})
            ctx.set_default_timeout(30_000)
            try:
                yield ctx
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(app, browser):
    pg = browser.new_page()
    pg.goto(app[0])
    pg.get_by_role("button", name="Generate").wait_for()
    yield pg
    pg.close()


def set_code(pg, text: str) -> None:
    """Replace the text of the Advanced box (a CodeMirror editor) as a user would: select all, type."""
    editor = pg.locator(".cm-content").first
    editor.click()
    pg.keyboard.press("Control+A")
    pg.keyboard.press("Delete")
    pg.keyboard.insert_text(text)  # as a paste: no auto-indent or bracket closing


def wait_drawn(locator, timeout_s: float = 20.0) -> bool:
    """True once the element's screenshot has some non-background pixels (the viewer loads and draws
    the GLB asynchronously, after the canvas appears)."""
    import io

    import numpy as np
    from PIL import Image

    end = time.monotonic() + timeout_s
    while True:
        img = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("L"), dtype=np.int16)
        if (np.abs(img - np.median(img)) > 24).mean() > 0.01:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.5)


def test_empty_prompt_shows_the_message_next_to_the_field(app, page):
    _, manager = app
    before = len(manager.jobs())
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_label("Steps (blank: preset)").fill("6")
    page.get_by_role("button", name="Generate").click()
    err = page.locator("#error-prompt")
    err.get_by_text("prompt is empty").wait_for()
    # under the prompt box, above the negative prompt
    prompt_box = page.get_by_label("Prompt", exact=True).bounding_box()
    negative_box = page.get_by_label("Negative prompt").bounding_box()
    err_box = err.bounding_box()
    assert prompt_box["y"] + prompt_box["height"] <= err_box["y"] < negative_box["y"], \
        (prompt_box, err_box, negative_box)
    # the other fields show nothing, and no job was queued
    assert not page.locator("#error-steps").is_visible()
    assert len(manager.jobs()) == before
    # a bad number lands under the numbers
    page.get_by_label("Prompt", exact=True).fill("a red cube")
    page.get_by_label("Steps (blank: preset)").fill("many")
    page.get_by_role("button", name="Generate").click()
    page.locator("#error-steps").get_by_text("whole number").wait_for()
    assert not page.locator("#error-prompt").is_visible()
    assert len(manager.jobs()) == before


def test_generate_shows_viewer_video_and_downloads(app, page, tmp_path):
    import trimesh

    url, manager = app
    t0 = time.monotonic()
    page.get_by_label("Prompt", exact=True).fill("a red cube")
    page.get_by_label("Steps (blank: preset)").fill("6")
    page.get_by_label("Render resolution (blank: preset)").fill("16")
    page.get_by_text("Advanced (config overrides)").click()
    set_code(page, ADVANCED)
    assert "export.turntable_resolution=32" in page.locator(".cm-content").first.inner_text()
    page.get_by_role("button", name="Generate").click()

    progress = page.locator("#progress")
    progress.get_by_text("finished").wait_for(timeout=TIMEOUT_MS)
    assert "step 6 / 6" in progress.inner_text()
    job = manager.jobs()[-1]
    assert job["settings"]["prompt"] == "a red cube" and job["steps"] == 6, job

    # the preview, the 3D viewer (GLB), the turntable video and the download links
    page.locator("#preview img").wait_for()
    canvas = page.locator("#result-glb canvas")
    canvas.wait_for()
    assert wait_drawn(canvas), "the 3D viewer's canvas stayed blank"
    video = page.locator("#result-video video")
    video.wait_for()
    assert video.get_attribute("src", timeout=5_000)
    links = page.locator("#downloads a")
    links.first.wait_for()
    names = [links.nth(i).inner_text().strip() for i in range(links.count())]
    hrefs = [links.nth(i).get_attribute("href") or "" for i in range(links.count())]
    assert any(h.endswith(".glb") for h in hrefs), (names, hrefs)
    assert any(h.endswith(".zip") for h in hrefs), (names, hrefs)
    assert any(h.endswith("config.yaml") for h in hrefs), (names, hrefs)

    # the finished run is listed in History without pressing Refresh
    page.locator(".gallery-item, button.thumbnail-item").first.wait_for(timeout=10_000)

    # the GLB link downloads a mesh
    glb_link = links.nth(next(i for i, h in enumerate(hrefs) if h.endswith(".glb")))
    with page.expect_download() as dl:
        glb_link.click()
    saved = tmp_path / "model.glb"
    dl.value.save_as(saved)
    mesh = trimesh.load(saved, force="mesh")
    assert len(mesh.vertices) > 0 and len(mesh.faces) > 0

    shot = artifacts_dir() / "app_browser_generate.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}  (click to results shown and downloaded: {time.monotonic() - t0:.1f} s)")

    # a past run picked in History stays shown (the page's own finished job must not replace it)
    other = manager.wait(manager.submit({"prompt": "a green cone", "prior": "shapes", "overrides": QUICK_API}),
                         timeout=120)
    assert other["status"] == "finished", other
    page.get_by_role("button", name="Refresh").click()
    page.get_by_label("Past runs (outputs folder)").click()
    page.get_by_role("option", name=other["run_name"], exact=False).click()
    title = page.locator("#result-title")
    title.get_by_text(other["run_name"]).wait_for()
    from threedistill.app.ui import POLL_SECONDS

    time.sleep(2 * POLL_SECONDS + 1)  # two polls of the page
    assert other["run_name"] in title.inner_text(), title.inner_text()



def test_resume_button_continues_a_stopped_run(app, page):
    """A run stopped mid-way, picked in History: Resume queues it, the page follows it, and it
    continues from the step it stopped at."""
    url, manager = app
    long = {"prompt": "a blue cube", "prior": "shapes", "overrides": QUICK_API.replace("run.steps=6", f"run.steps={LONG_STEPS}")}
    jid = manager.submit(long)
    end = time.time() + 60
    while manager.status(jid)["step"] < 2 and time.time() < end:
        time.sleep(0.05)
    manager.cancel(jid)
    stopped = manager.wait(jid, timeout=60)
    assert stopped["status"] == "stopped", stopped
    page.get_by_role("button", name="Refresh").click()
    page.get_by_label("Past runs (outputs folder)").click()
    page.get_by_role("option", name=f"{stopped['run_name']} — stopped", exact=False).click()
    page.get_by_role("button", name="Resume").click()
    page.locator("#resume-msg").get_by_text(f"Resuming {stopped['run_name']}").wait_for()
    new = next(j for j in manager.jobs() if j["resume_of"] == stopped["run_name"])
    try:
        progress = page.locator("#progress")
        progress.get_by_text("a blue cube").wait_for()
        end = time.time() + 60
        while manager.status(new["id"])["start_step"] is None and time.time() < end:
            time.sleep(0.1)
        assert manager.status(new["id"])["start_step"] == stopped["step"]
        progress.get_by_text("running").wait_for(timeout=TIMEOUT_MS)
        shot = artifacts_dir() / "app_browser_resume.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:  # a failure above must not leave the job running into the next test's queue
        manager.cancel(new["id"])
    assert manager.wait(new["id"], timeout=60)["status"] == "stopped"
    # a stopped run offers Resume in its progress line
    progress.get_by_text("Resume it").wait_for(timeout=TIMEOUT_MS)


def test_preview_button_and_curves(app, page, monkeypatch):
    """Preview draws the 2D grid for the form's prompt and guidance scale (no job queued); the running
    job's curves appear live, and a run picked in History shows its curves with its results."""
    from threedistill.app import ui

    url, manager = app
    monkeypatch.setattr(ui, "PREVIEW_SAMPLES", 3)  # in-process server: the handler reads these per click
    monkeypatch.setattr(ui, "PREVIEW_STEPS", 4)
    before = len(manager.jobs())
    page.get_by_label("Prompt", exact=True).fill("a blue sphere")
    page.get_by_label("Guidance scale (blank: preset)").fill("7")
    page.get_by_role("button", name="Preview", exact=True).click()
    grid = page.locator("#prompt-preview img")
    grid.wait_for(timeout=TIMEOUT_MS)
    assert wait_drawn(grid), "the preview grid stayed blank"
    message = page.locator("#prompt-preview-message")
    message.get_by_text("a blue sphere, back view").wait_for()
    assert "CFG 7" in message.inner_text() and "4 DDIM steps" in message.inner_text()
    assert len(manager.jobs()) == before  # a preview queues nothing

    # a longer job: the page follows it and draws its curves while it runs
    jid = manager.submit({"prompt": "a red torus", "prior": "shapes", "overrides": QUICK_API.replace(
        "run.steps=6", f"run.steps={LONG_STEPS}") + "\nexport.formats=[]\nexport.turntable=false"})
    # A job submitted through the API: a fresh page follows the active job (this page may still follow
    # an earlier test's stopped job).
    page.reload()
    live = page.locator("#live-curves img")
    live.wait_for(timeout=TIMEOUT_MS)
    assert manager.status(jid)["status"] == "running"  # drawn while the job runs
    assert wait_drawn(live)
    first = live.get_attribute("src")
    deadline = time.monotonic() + 120  # generous: on a loaded 2-core machine steps come slowly
    while live.get_attribute("src") == first and time.monotonic() < deadline:  # redrawn as steps arrive
        time.sleep(1.0)
    assert live.get_attribute("src") != first, "the live curves were not redrawn"
    shot = artifacts_dir() / "app_browser_preview_curves.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    manager.cancel(jid)
    job = manager.wait(jid, timeout=120)
    assert job["status"] == "stopped", job

    # a run picked in History shows its curves in the result panel
    page.get_by_role("button", name="Refresh").click()
    page.get_by_label("Past runs (outputs folder)").click()
    page.get_by_role("option", name=job["run_name"], exact=False).click()
    page.locator("#result-title").get_by_text(job["run_name"]).wait_for()
    curves = page.locator("#result-curves img")
    curves.wait_for()
    assert wait_drawn(curves)
    page.screenshot(path=str(artifacts_dir() / "app_browser_history_curves.png"), full_page=True)
