"""benchmarks/gps_scaling.py runs (--quick) and writes complete results: measured rows for both
layers, the mesh's recall where the tree search ran, estimated dense rows beyond --dense-max (marked
"does not fit" above the memory limit), and the targets."""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks`

from benchmarks import gps_scaling  # noqa: E402


def test_gps_scaling_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(gps_scaling, "available_memory", lambda device: 0.01 * gps_scaling.GiB)  # below dense's peak
    returned = gps_scaling.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "gps_scaling.json").read_text())
    assert json.loads(json.dumps(returned)) == written and (tmp_path / "gps_scaling.png").stat().st_size > 0
    dense, mesh = (written["rows"][model] for model in gps_scaling.MODELS)
    assert [r["nodes"] for r in dense] == [256, 512] and [r["nodes"] for r in mesh] == [256, 512, 1024]
    assert [r["nodes"] for r in written["dense_estimates"]] == [1024] and not written["dense_estimates"][0]["fits"]
    for r in dense + mesh:
        assert r["edges"] > r["nodes"] and math.isfinite(r["step_ms"]) and r["step_ms"] > 0 and r["peak_gib"] >= 0
    assert [r["recall"] is None for r in mesh] == [True, True, False]  # the tree search above --exact-max-nodes 512
    assert 0.8 < mesh[2]["recall"] <= 1.0  # clustered features: measured 0.99
    growth = dense[1]["step_ms"] / dense[0]["step_ms"]  # power law through the two measured rows, one more doubling
    assert math.isclose(written["dense_estimates"][0]["step_ms"], dense[1]["step_ms"] * growth, rel_tol=1e-9)
    text = (tmp_path / "gps_scaling.md").read_text()
    assert "(est.)" in text and "does not fit (" in text and "> 0.01 GiB)" in text
    assert "Targets: MeshGPSConv memory linear in the nodes: its peak grows" in text
