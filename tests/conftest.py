"""Shared test setup: no network, and tiny random diffusers pipelines built once per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """Tiny Stable-Diffusion-like latent pipeline (epsilon prediction, 64x64 images)."""
    from threedistill.priors.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("priors") / "tiny-sd", kind="sd")


@pytest.fixture(scope="session")
def tiny_sd_vpred_path(tmp_path_factory) -> Path:
    """Tiny Stable-Diffusion-like latent pipeline with v-prediction."""
    from threedistill.priors.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("priors") / "tiny-sd-v", kind="sd", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_if_path(tmp_path_factory) -> Path:
    """Tiny DeepFloyd-IF-stage-I-like pixel pipeline (learned variance, 64x64 images)."""
    from threedistill.priors.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("priors") / "tiny-if", kind="if")
