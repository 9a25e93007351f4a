"""Every example and the WikiText benchmark runs end to end in quick mode, so none can rot."""
import json
import math

import pytest

from conftest import load_example


@pytest.mark.parametrize("dataset", ["geometric_shapes", "generated"])
def test_point_cloud_quick(dataset, data_dir, tmp_path):
    """The five nets side by side with per-epoch curves; a second call reads every run from the cache."""
    argv = ["--quick", "--dataset", dataset, "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "runs")]
    results = load_example("point_cloud").main(argv)
    assert len(results) == 5
    for model, metrics in results.items():
        assert 0.0 <= metrics["test_acc"] <= 1.0 and len(metrics["test_accs"]) == metrics["seeds"] == 1, (model, metrics)
    (out,) = (tmp_path / "runs").iterdir()
    assert (out / "curves.png").exists() and (out / "summary.json").exists()
    runs = sorted(out.glob("*-seed0.json"))
    assert [r.name for r in runs] == ["dgcnn-seed0.json", "mesh-block-w16-seed0.json", "mesh-features-w16-seed0.json",
                                      "mesh-relative-w16-seed0.json", "mesh-seed0.json"]
    assert all(len(json.loads(r.read_text())["curve"]) == 2 for r in runs)  # --quick: 2 epochs, one record each
    stamps = [r.stat().st_mtime_ns for r in runs]
    assert load_example("point_cloud").main(argv) == results
    assert [r.stat().st_mtime_ns for r in runs] == stamps, "finished runs are read back, not trained again"
    if dataset == "geometric_shapes":
        assert list((tmp_path / "data").glob("*/**/processed/*.pt")), "PyG processed the copied raw files in the cache"
    else:  # --models picks nets (here read back from the cache)
        assert list(load_example("point_cloud").main(argv + ["--models", "features", "dgcnn"])) == [
            "TMT mesh attention + relative features", "DGCNN (EdgeConv + knn_graph)"]


@pytest.mark.parametrize("name, argv", [
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
    if "cora" in argv:
        assert list(tmp_path.glob("*/**/processed/*.pt")), "PyG processed the copied raw files in the cache"
    if "cora" in argv:
        assert len(results) == 5 and 0 < results["MeshAttentionConv (graph ∪ 8-NN mesh of class scores)"]["mesh_share"] < 1


def test_wikitext_lm_quick(data_dir, tmp_path):
    result = load_example("wikitext_lm").main(
        ["--quick", "--data-dir", str(data_dir / "wikitext-2"), "--out", str(tmp_path), "--prompt", "the game"])
    assert math.isfinite(result["ppl"]) and result["targets"] > 1000 and 0 < result["work_fraction"] <= 1
    assert result["sample"].startswith("the game") and len(result["sample"].split()) == 2 + 20

