"""Property-based test of the config schema: any value for any key of any group, given as a typed
value (a form's field) or as ``key=value`` text (the CLI, the app's Advanced box, a batch row),
gives either a valid config that config.yaml and run.json can hold, or a one-line UserError,
never another exception."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from threedistill.config import Config, load_config, to_yaml
from threedistill.errors import UserError


def _leaf_keys(node, prefix=""):
    for name in node.keys():
        key = f"{prefix}.{name}" if prefix else str(name)
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            yield from _leaf_keys(child, key)
        else:
            yield key


KEYS = sorted(_leaf_keys(OmegaConf.structured(Config)))

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(),  # any size, e.g. 10**30 and beyond 2**63
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 1e-320]),
    st.text(max_size=40),
    st.sampled_from(["", "../x", "/etc/passwd", "file:/etc/passwd", "run:/tmp", "~/", "${oc.env:HOME}",
                     "a\x00b", "x" * 5000, "sds-mesh", "[1,2", "{a: 1}", "nan", "inf", "1e999"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=6), st.dictionaries(st.text(max_size=8), scalars, max_size=3))


def _check_outcome(make):
    try:
        cfg = make()
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 1000, msg
        return
    # A valid config: what config.yaml and run.json will hold
    text = to_yaml(cfg)
    assert OmegaConf.create(text) is not None
    container = OmegaConf.to_container(cfg, resolve=True)
    json.dumps(container, allow_nan=False)  # run.json's encoder: no NaN, inf
    json.dumps({k: container["run"][k] for k in ("prompt", "steps", "seed", "resolution")}, allow_nan=False)
    assert abs(cfg.run.steps) < 2**63 and abs(cfg.run.seed) < 2**63


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(key=st.sampled_from(KEYS), value=values)
def test_any_typed_value_for_any_key(key, value):
    _check_outcome(lambda: load_config(None, values={key: value}))


@FUZZ
@given(key=st.sampled_from(KEYS), value=values)
def test_any_override_text_for_any_key(key, value):
    text = value if isinstance(value, str) else json.dumps(value) if not isinstance(value, float) else repr(value)
    _check_outcome(lambda: load_config(None, [f"{key}={text}"]))


@FUZZ
@given(data=st.dictionaries(st.sampled_from(KEYS), values, min_size=2, max_size=5))
def test_several_keys_at_once(data):
    _check_outcome(lambda: load_config(None, values=data))


@pytest.mark.parametrize("key", ["run.steps", "run.seed", "run.resolution", "camera.batch_size", "export.texture_size",
                                 "export.mesh_resolution", "export.turntable_frames", "export.turntable_resolution",
                                 "guidance.guidance_scale", "optim.lr", "representation.gaussians.num_points",
                                 "representation.gaussians.max_gaussians", "representation.gaussians.lr_means",
                                 "representation.nerf.num_samples", "guidance.lora_rank"])
def test_every_user_number_is_bounded(key):
    """Each number a user sets has an upper bound in the schema (abuse: 10**12 is refused)."""
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}=1000000000000"])
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}=-1000000000000"])


def test_every_numeric_key_refuses_nan_and_inf():
    """No key, bounded or not, lets NaN or inf through to config.yaml / run.json."""
    schema = OmegaConf.structured(Config)
    numeric = [k for k in KEYS if isinstance(OmegaConf.select(schema, k), (int, float))
               and not isinstance(OmegaConf.select(schema, k), bool)]
    assert len(numeric) > 60
    for key in numeric:
        for bad in (math.nan, math.inf, 10**30):
            with pytest.raises(UserError):
                load_config(None, values={key: bad})
