"""Every registered loss works by name alone: `guidance.name=X` on the default config (the built-in
shapes prior, NeRF, 32 px), with no other guidance or prior key set, runs two steps with a finite
loss. NFSD, which needs a negative prompt, takes its paper's fixed one and says so in the log."""

import json
import logging
import math

import pytest

from threedistill.distill import Distiller
from threedistill.guidance import guidance_names
from threedistill.guidance.nfsd import PAPER_NEGATIVE_PROMPT
from threedistill.pipeline import RunRequest, prepare_run
from threedistill.priors import PriorCache

#: One loaded shapes prior for every loss (the run-length and export keys below are not
#: guidance settings: they only keep the test short).
_PRIORS = PriorCache()
_SHORT = ["run.steps=2", "run.preview_every=100", "export.formats=[]", "export.turntable=false", "run.progress=false"]


def test_every_registered_loss_is_tested():
    assert set(guidance_names()) >= {"sds", "vsd", "esd", "ism", "csd", "nfsd"}


@pytest.mark.slow
@pytest.mark.parametrize("name", guidance_names())
def test_loss_by_name_alone_runs_two_steps(tmp_path, caplog, name):
    cfg, folder = prepare_run(RunRequest(prompt="a red cube", overrides=[f"guidance.name={name}", *_SHORT],
                                         out_dir=tmp_path))
    assert cfg.prior.name == "shapes" and cfg.prior.negative_prompt == ""
    with caplog.at_level(logging.WARNING, logger="threedistill"):
        result = Distiller(cfg, run_dir=folder, priors=_PRIORS).run()
    assert result.status == "finished"
    lines = [json.loads(line) for line in folder.metrics_path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(math.isfinite(line["loss"]) for line in lines)
    said_paper_prompt = any(PAPER_NEGATIVE_PROMPT in r.getMessage() for r in caplog.records)
    assert said_paper_prompt == (name == "nfsd")
