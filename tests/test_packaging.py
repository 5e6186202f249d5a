"""The package carries its presets and shipped weights: found from any working directory through
the package (not the repository), listed by `threedistill presets`, and inside a built wheel.
(.ci/run goes further: tools/check-wheel.sh installs the wheel into a fresh environment and runs
`threedistill generate` from an empty folder.)"""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import threedistill
from threedistill.cli import main
from threedistill.config import CONFIG_DIR, list_presets, load_config, resolve_config_path
from threedistill.priors import ASSETS_DIR, SHIPPED_PRIOR

PACKAGE = Path(threedistill.__file__).resolve().parent
REPO = PACKAGE.parent


def _data_files():
    """Every file of the presets and the shipped weights, relative to the package."""
    return sorted(str(p.relative_to(PACKAGE)) for d in (CONFIG_DIR, ASSETS_DIR) for p in Path(d).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def test_presets_and_weights_live_inside_the_package():
    assert Path(CONFIG_DIR).resolve().parent == PACKAGE
    assert Path(ASSETS_DIR).resolve().parent == PACKAGE
    assert (SHIPPED_PRIOR / "model_index.json").is_file()
    assert (ASSETS_DIR / "shapes-classifier.safetensors").is_file()
    files = _data_files()
    assert "presets/sds-nerf.yaml" in files and "assets/shapes-prior/unet/diffusion_pytorch_model.safetensors" in files


def test_presets_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("sds-gaussians") == Path(CONFIG_DIR) / "sds-gaussians.yaml"
    cfg = load_config(["vsd-gaussians"])  # extends: [vsd-nerf, gaussians], also from the package
    assert cfg.guidance.name == "vsd" and cfg.representation.name == "gaussians"


def test_presets_command_lists_every_preset_with_a_one_line_description(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = sorted(p.stem for p in Path(CONFIG_DIR).glob("*.yaml"))
    assert [line.split()[0] for line in out] == names
    for name, description in list_presets():
        # a sentence of its own (not the first line of a longer one), short enough for a terminal
        assert description.endswith(".") and 20 < len(description) <= 100, (name, description)
        assert any(line.startswith(name + " ") and line.endswith(description) for line in out)


@pytest.mark.slow
def test_a_built_wheel_carries_the_presets_and_the_weights(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (needed to build the wheel without network)")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "threedistill", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("threedistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _data_files() if f"threedistill/{f}" not in names]
    assert not missing, f"package data missing from the wheel: {missing}"
    modules = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    assert [m for m in modules if m not in names] == []
