"""The quality matrix's ablation bookkeeping (benchmarks/quality_matrix.py): variants become cells
named <preset>+<variant>, and the ablation table shows each variant against its preset."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_matrix as qm  # noqa: E402


def test_parse_variants_splits_name_and_overrides():
    v = qm.parse_variants(['perp=guidance.perp_neg=true camera.batch_size=2', 'lr=optim.lr=0.02'])
    assert v == {"perp": ["guidance.perp_neg=true", "camera.batch_size=2"], "lr": ["optim.lr=0.02"]}
    for bad in ["noequals", "=x=1", "a/b=x=1", "name="]:
        with pytest.raises(SystemExit):
            qm.parse_variants([bad])


def _write(out: Path, cell: str, **summary):
    (out / cell).mkdir(parents=True)
    (out / cell / "results.json").write_text(json.dumps({"summary": {"all": {"runs": 2, **summary}}, "runs": []}))


def test_ablation_table_reports_variant_minus_preset(tmp_path):
    _write(tmp_path, "sds-nerf", iou=0.80, size=1.10, haze=0.05)
    _write(tmp_path, "sds-nerf+perp", iou=0.86, size=1.00, haze=0.02)
    table = qm.ablation(tmp_path, ["sds-nerf"], {"perp": ["guidance.perp_neg=true"], "missing": ["x=1"]})
    row = next(l for l in table.splitlines() if "| perp |" in l)
    assert "0.860 (+0.060)" in row and "1.00 (-0.10)" in row and "0.020 (-0.030)" in row
    assert "`guidance.perp_neg=true`" in row
    missing = next(l for l in table.splitlines() if "| missing |" in l)
    assert "0.860" not in missing and "–" in missing
    assert (tmp_path / "ablation.md").read_text() == table


def test_variant_cells_write_to_their_own_folder(tmp_path):
    cmd = qm.cell_command("sds-nerf", tmp_path, ["a red cube"], [0], ["guidance.perp_neg=true"], folder="sds-nerf+perp")
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "sds-nerf+perp")
    assert cmd[cmd.index("--config") + 1] == "sds-nerf"
    assert cmd[-1] == "guidance.perp_neg=true"
