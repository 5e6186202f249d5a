"""Hub ids not in the local cache are downloaded on first use, tested offline at the
``huggingface_hub`` boundary: ``snapshot_download`` is replaced by a fake hub that serves a tiny
pipeline folder (with files a prior must not fetch) into the cache, and raises the library's own
exception classes for gated, missing and unreachable repos."""

import fnmatch
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from threedistill.config import load_config
from threedistill.errors import MissingWeightsError, UserError
from threedistill.priors import PriorConfig, check_prior_available, hub_allow_patterns, load_prior

REPO = "tinyorg/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


@pytest.fixture(scope="module")
def hub_repo(tiny_sd_path, tmp_path_factory) -> Path:
    """The repo as the hub holds it: the tiny pipeline plus what a prior must not download (a safety
    checker, a feature extractor, .bin duplicates) and an fp16 variant of every weight file."""
    repo = tmp_path_factory.mktemp("hub") / "tiny-sd"
    shutil.copytree(tiny_sd_path, repo)
    (repo / "safety_checker").mkdir()
    (repo / "safety_checker" / "config.json").write_text("{}")
    (repo / "safety_checker" / "model.safetensors").write_bytes(b"never fetched")
    (repo / "feature_extractor").mkdir()
    (repo / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    for component, stem in WEIGHTS.items():
        plain = repo / component / f"{stem}.safetensors"
        shutil.copy(plain, repo / component / f"{stem}.fp16.safetensors")
        (repo / component / f"{stem}.bin").write_bytes(b"never fetched")
    return repo


class FakeHub:
    """``snapshot_download`` over ``repo``: local-only calls read the cache (LocalEntryNotFoundError
    when absent), others copy the files matching ``allow_patterns`` into the cache's snapshot; or
    raise ``error``."""

    def __init__(self, repo: Path, error: Exception | None = None):
        self.repo, self.error, self.calls = repo, error, []

    def __call__(self, repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None, **kw):
        validate_repo_id(repo_id)
        self.calls.append({"repo_id": repo_id, "revision": revision, "local_files_only": local_files_only,
                           "allow_patterns": allow_patterns})
        snapshot = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        if local_files_only:
            if not snapshot.is_dir():
                raise LocalEntryNotFoundError("not in the cache")
            return str(snapshot)
        if self.error is not None:
            raise self.error
        for f in self.repo.rglob("*"):
            rel = f.relative_to(self.repo).as_posix()
            if f.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snapshot / rel)
        return str(snapshot)

    def downloads(self):
        return [c for c in self.calls if not c["local_files_only"]]


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the suite


def _install(monkeypatch, hub):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    return hub


def _files(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_hub_id_not_in_the_cache_is_downloaded_once_with_only_the_prior_components(online, monkeypatch, tmp_path, hub_repo):
    hub = _install(monkeypatch, FakeHub(hub_repo))
    cfg = PriorConfig(name=REPO, cache_dir=str(tmp_path / "cache"))
    check_prior_available(cfg)  # the check before a run: fine when online, and downloads nothing
    assert hub.downloads() == []
    prior = load_prior(cfg, "cpu")
    assert prior.name == REPO and prior.image_resolution == 64
    (call,) = hub.downloads()
    assert call["repo_id"] == REPO and call["revision"] is None
    assert call["allow_patterns"] == hub_allow_patterns(None)
    snapshot = tmp_path / "cache" / "models--tinyorg--tiny-sd" / "snapshots" / COMMIT
    files = _files(snapshot)
    assert "model_index.json" in files and "scheduler/scheduler_config.json" in files
    assert {f"{c}/{s}.safetensors" for c, s in WEIGHTS.items()} <= set(files)
    assert not [f for f in files if f.startswith(("safety_checker/", "feature_extractor/"))]
    assert not [f for f in files if f.endswith(".bin") or ".fp16." in f]
    load_prior(cfg, "cpu")  # now from the cache: no second download
    assert len(hub.downloads()) == 1


def test_revision_and_fp16_variant_are_passed_and_only_that_variant_is_fetched(online, monkeypatch, tmp_path, hub_repo):
    hub = _install(monkeypatch, FakeHub(hub_repo))
    cfg = load_config(overrides=[f"prior.name={REPO}", f"prior.cache_dir={tmp_path / 'cache'}", "prior.revision=v1.0",
                                 "prior.variant=fp16"]).prior
    prior = load_prior(cfg, "cpu")
    assert prior.name == REPO
    (call,) = hub.downloads()
    assert call["revision"] == "v1.0" and call["allow_patterns"] == hub_allow_patterns("fp16")
    files = _files(tmp_path / "cache" / "models--tinyorg--tiny-sd" / "snapshots" / COMMIT)
    weights = [f for f in files if f.endswith(".safetensors")]
    assert sorted(weights) == sorted(f"{c}/{s}.fp16.safetensors" for c, s in WEIGHTS.items())


def test_a_cached_snapshot_without_the_asked_variant_is_completed_by_a_download(online, monkeypatch, tmp_path, hub_repo):
    hub = _install(monkeypatch, FakeHub(hub_repo))
    load_prior(PriorConfig(name=REPO, cache_dir=str(tmp_path / "c")), "cpu")  # plain weights
    load_prior(PriorConfig(name=REPO, cache_dir=str(tmp_path / "c"), variant="fp16"), "cpu")
    assert [c["allow_patterns"] for c in hub.downloads()] == [hub_allow_patterns(None), hub_allow_patterns("fp16")]


@pytest.mark.parametrize("how", ["env", "config"])
def test_offline_nothing_is_downloaded_and_the_message_says_how_to_get_it(monkeypatch, tmp_path, hub_repo, how):
    if how == "env":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = _install(monkeypatch, FakeHub(hub_repo))
    cfg = PriorConfig(name=REPO, cache_dir=str(tmp_path / "cache"), offline=(how == "config"))
    for attempt in (lambda: check_prior_available(cfg), lambda: load_prior(cfg, "cpu")):
        with pytest.raises(MissingWeightsError) as err:
            attempt()
        msg = str(err.value)
        assert "\n" not in msg and REPO in msg and str(tmp_path / "cache") in msg
        assert f"hf download {REPO}" in msg and "offline" in msg
    assert hub.downloads() == []


def _hub_error(cls, status: int):
    """The library's exception class as huggingface_hub raises it (with an HTTP response)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    request = httpx.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls(f"{status} Client Error", response=httpx.Response(status, request=request))


@pytest.mark.parametrize("error, expected", [
    (lambda: _hub_error(GatedRepoError, 403), ["gated", "hf auth login", "HF_TOKEN", f"huggingface.co/{REPO}"]),
    (lambda: _hub_error(RepositoryNotFoundError, 404), ["prior.name", "hf auth login", "HF_TOKEN", "private"]),
    (lambda: _hub_error(RevisionNotFoundError, 404), ["revision 'v9'", "prior.revision"]),
    (lambda: LocalEntryNotFoundError("cannot reach the hub"), ["could not be downloaded", "network"]),
], ids=["gated", "missing-repo", "missing-revision", "no-network"])
def test_hub_errors_are_one_line_that_says_what_to_do(online, monkeypatch, tmp_path, hub_repo, error, expected):
    _install(monkeypatch, FakeHub(hub_repo, error=error()))
    cfg = PriorConfig(name=REPO, cache_dir=str(tmp_path / "cache"), revision="v9")
    with pytest.raises(MissingWeightsError) as err:
        load_prior(cfg, "cpu")
    msg = str(err.value)
    assert "\n" not in msg and REPO in msg
    for part in expected:
        assert part in msg, (part, msg)
    assert not (tmp_path / "cache" / "models--tinyorg--tiny-sd" / "snapshots" / COMMIT / "model_index.json").exists()


def test_an_invalid_hub_id_is_refused_before_any_download(online, monkeypatch, tmp_path, hub_repo):
    hub = _install(monkeypatch, FakeHub(hub_repo))
    with pytest.raises(MissingWeightsError, match="not a valid Hugging Face hub id"):
        check_prior_available(PriorConfig(name="no/such/folder", cache_dir=str(tmp_path)))
    assert hub.downloads() == []


def test_variant_is_validated():
    with pytest.raises(UserError, match="prior.variant"):
        load_config(overrides=["prior.variant=fp 16"])
