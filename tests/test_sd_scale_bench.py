"""Smoke test of ``benchmarks/sd_scale.py`` on the CPU with the tiny prior: every column of its table
is filled and a step costs at least about what its own UNet calls and VAE encode cost alone
(a sanity bound on the limit's bookkeeping, not a timing assertion: ``step / limit`` is ~1 or more)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "sd_scale.py"


@pytest.mark.slow
def test_sd_scale_smoke(tmp_path, tiny_sd_path):
    spec = importlib.util.spec_from_file_location("sd_scale", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["sd_scale"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    # The tiny prior (as --tiny builds it), and no empty-space grid refresh: the CPU NeRF's grid
    # (64^3 field queries) would cost more than the rest of the test.
    results = bench.main(["--prior", str(tiny_sd_path), "--device", "cpu", "--cells", "sds/nerf-64,vsd/nerf-64",
                          "--steps", "1", "--warmup", "1", "--out", str(out),
                          "representation.nerf.skip_grid_resolution=0"])
    rows = bench.parse_table(out.read_text())
    assert [r["cell"] for r in rows] == ["sds/nerf-64", "vsd/nerf-64"]
    for row in rows:
        assert set(row) == set(bench.COLUMNS) and all(v and v != "nan" for v in row.values()), row
        assert float(row["step / limit"]) >= 0.5, row
    # UNet batch items per step: SDS one guided batch (uncond + cond) of one render plus the two
    # Perp-Neg negatives that the sd overlay turns on; VSD the same plus the LoRA's particle score
    # and its training forward.
    assert [r.items for r in results] == [4, 6]
    assert [r.render_px for r in results] == [8, 8]
