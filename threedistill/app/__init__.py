"""The Gradio web app: :mod:`threedistill.app.jobs` (server-side job queue, no Gradio) and
:mod:`threedistill.app.ui` (the Blocks page and its launcher)."""

from threedistill.app.jobs import JobManager, JobSettings, ValidationError, list_presets

__all__ = ["JobManager", "JobSettings", "ValidationError", "list_presets"]
