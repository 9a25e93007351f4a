"""Every example and the WikiText benchmark runs end to end in quick mode, so none can rot."""
import math

import pytest

from conftest import load_example


@pytest.mark.parametrize("name, argv", [
    ("point_cloud", ["--dataset", "geometric_shapes"]),
    ("point_cloud", ["--dataset", "generated"]),
    ("node_classification", ["--dataset", "cora", "--models", "mesh", "gcn", "gat", "gps", "mesh_gps"]),
    ("node_classification", ["--dataset", "sbm", "--models", "mesh", "gcn"]),
])
def test_example_quick(name, argv, data_dir, tmp_path):
    """Real datasets come from the shared raw files, copied into a fresh cache (as a user's first run)."""
    results = load_example(name).main(
        ["--quick", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path)] + argv)
    assert len(results) >= 2  # TMT and at least one baseline, side by side
    for model, metrics in results.items():
        accuracy = metrics.get("test_acc", metrics.get("acc"))
        assert accuracy is not None and 0.0 <= accuracy <= 1.0, (model, metrics)
    if "geometric_shapes" in argv or "cora" in argv:
        assert list(tmp_path.glob("*/**/processed/*.pt")), "PyG processed the copied raw files in the cache"
    if "cora" in argv:
        assert len(results) == 5 and 0 < results["MeshAttentionConv (graph ∪ 8-NN mesh of class scores)"]["mesh_share"] < 1


def test_wikitext_lm_quick(data_dir, tmp_path):
    result = load_example("wikitext_lm").main(
        ["--quick", "--data-dir", str(data_dir / "wikitext-2"), "--out", str(tmp_path), "--prompt", "the game"])
    assert math.isfinite(result["ppl"]) and result["targets"] > 1000 and 0 < result["work_fraction"] <= 1
    assert result["sample"].startswith("the game") and len(result["sample"].split()) == 2 + 20


def test_exit_curve_quick(data_dir, tmp_path):
    from benchmarks.exit_curve import main
    result = main(["--quick", "--out", str(tmp_path), "--data-dir", str(data_dir / "wikitext-2")])
    points = result["runs"]["consistency"]["points"]
    assert points[0]["threshold"] is None and points[0]["work_fraction"] == 1.0
    assert all(math.isfinite(p["ppl"]) and 0 < p["work_fraction"] <= 1 for p in points)
    assert (tmp_path / "exit_curve.png").exists()
