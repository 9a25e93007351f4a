"""benchmarks/recall.py --zoology: Zoology's MQAR data, the cached and resumable sweep, the table from the cache."""
import json
from collections import Counter

import pytest
import torch

from benchmarks import recall


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_zoology_sequences_hold_their_answers(random_non_queries):
    S, pairs, V = 48, 6, 64
    ids, labels = recall.zoology_batch(32, S, pairs, V, torch.Generator().manual_seed(0),
                                       random_non_queries=random_non_queries)
    assert ids.shape == labels.shape == (32, S)
    context = 2 * pairs
    for row, label in zip(ids, labels):
        keys, values = row[0:context:2].tolist(), row[1:context:2].tolist()
        assert len(set(keys)) == len(set(values)) == pairs, "keys and values are distinct within a sequence"
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        where = (label >= 0).nonzero().view(-1)
        assert where.numel() == pairs and bool((where >= context).all()) and bool(((where - context) % 2 == 0).all())
        pair = dict(zip(keys, values))
        assert sorted(row[where].tolist()) == sorted(keys), "every key is asked once"
        assert all(int(label[i]) == pair[int(row[i])] for i in where), "the label is the value paired with the key"
        if not random_non_queries:  # the value is not repeated after its query: only queries in the query region
            rest = torch.ones(S, dtype=torch.bool)
            rest[:context], rest[where] = False, False
            assert not bool(row[rest].any())
    same = recall.zoology_batch(32, S, pairs, V, torch.Generator().manual_seed(0), random_non_queries=random_non_queries)
    assert torch.equal(same[0], ids) and torch.equal(same[1], labels), "the generator decides the data"


def test_zoology_query_gaps_follow_the_power_law():
    """power_a 0.01: the first gap is far more likely than the last (p ~ gap ** -0.99); power_a 1: uniform."""
    def first_gaps(power_a):
        _, labels = recall.zoology_batch(4000, 64, 1, 32, torch.Generator().manual_seed(1), power_a=power_a)
        return Counter(((labels[:, 2:] >= 0).nonzero()[:, 1] // 2).tolist())
    skewed, flat = first_gaps(0.01), first_gaps(1.0)
    assert skewed[0] > 5 * skewed[30] and skewed[0] > 0.15 * 4000
    assert max(flat.values()) < 2.5 * min(flat.values())


def test_zoology_rows_have_equal_parameters():
    configs = recall.zoology_configs(recall.ZOOLOGY_SIZE, 512)
    assert list(configs) == ["vanilla", "mesh", "default", "routed", "window", "explore", "warmup"]
    assert "routed" not in recall.zoology_configs(recall.ZOOLOGY_SIZE, 256)
    params = [recall.count_parameters(c) for c in configs.values()]
    assert max(params) / min(params) < 1.02
    vanilla, mesh, default, routed, window, explore, warmup = configs.values()
    assert explore.mesh_explore == recall.EXPLORE_SLOTS and warmup.mesh_dense_warmup == 200
    assert all(getattr(c, f) == getattr(mesh, f) for c in (explore, warmup) for f in ("graph_k", "mesh_window", "use_decay"))
    assert window.graph_k == 0 and window.mesh_window == mesh.graph_k + mesh.mesh_window, "the mesh's slots, no search"
    assert not vanilla.use_mesh and mesh.use_mesh and not mesh.use_anchors and not mesh.use_decay
    assert mesh.mesh_window == 8 and mesh.mesh_similarity == "attention" and routed.mesh_search == "routed"
    assert default.use_anchors and default.use_decay and default.dual_stream and not default.use_exit


def test_answer_logits_equal_the_full_head():
    cfg = recall.zoology_configs(dict(recall.ZOOLOGY_SIZE, vocab_size=64, d_model=16, mlp_dim=32), 32)["default"]
    torch.manual_seed(0)
    model = recall.TMTModel(cfg).eval()
    ids, labels = recall.zoology_batch(4, 32, 4, 64, torch.Generator().manual_seed(0))
    full = model(ids).logits[labels >= 0]
    model.lm_head = recall.final_states
    logits, target = recall.answer_logits(model, ids, labels)
    torch.testing.assert_close(logits, full)
    assert torch.equal(target, labels[labels >= 0])


def test_zoology_sweep_caches_resumes_and_tabulates(tmp_path, monkeypatch):
    argv = ["--zoology", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-gate"]
    result = recall.main(argv)
    cached = sorted((tmp_path / "runs").glob("*.json"))
    assert len(cached) == 7 * 2, "vanilla, mesh, default, routed, window, explore, warmup at two lrs"
    run = json.loads(cached[0].read_text())
    assert run["curve"][0]["sequences"] == 0 and run["curve"][-1]["sequences"] == run["sequences"]
    assert all(0 <= c["accuracy"] <= 1 for c in run["curve"]) and run["point"]["S"] == 32
    assert run["stopped"] == "budget" and run["budget"] == 48
    assert len(list((tmp_path / "partial").glob("*.pt"))) == 14, "runs cut by the budget keep their checkpoint"
    assert {r["row"] for r in result["runs"]} == set(recall.ZOOLOGY_ROWS)
    md = (tmp_path / "recall_zoology.md").read_text()
    assert md.startswith("## recall_zoology") and "benchmarks.recall --zoology" in md
    assert (tmp_path / "recall_zoology.png").stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")
    monkeypatch.setattr(recall, "zoology_run", no_training)
    again = recall.main(argv)
    assert again["runs"] == result["runs"]
    (tmp_path / "recall_zoology.md").unlink()
    table = recall.main(argv + ["--table-only"])
    assert table["runs"] == result["runs"] and (tmp_path / "recall_zoology.md").exists()
    next((tmp_path / "runs").glob("*_mesh_lr0.01_*.json")).unlink()  # its checkpoint stays: a run in progress
    table = recall.main(argv + ["--table-only"])
    assert "Runs in progress" in (tmp_path / "recall_zoology.md").read_text()
    assert not any(r["row"] == "mesh" and r["lr"] == 0.01 for r in table["runs"]), "never a finished row"

    monkeypatch.undo()  # a longer budget continues the cached runs from their checkpoints
    longer = recall.main(argv + ["--points", "32:4:8:64", "--rows", "vanilla", "--lrs", "3e-3"])
    vanilla, = [r for r in longer["runs"] if r["row"] == "vanilla" and r["lr"] == 3e-3]
    before, = [r for r in result["runs"] if r["row"] == "vanilla" and r["lr"] == 3e-3]
    assert vanilla["sequences"] == 64 and vanilla["curve"][:len(before["curve"])] == before["curve"]


def test_zoology_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A run killed after an evaluation continues from its checkpoint to the same curve as an uninterrupted run."""
    size = dict(recall.ZOOLOGY_SIZE, vocab_size=64, d_model=16, mlp_dim=32)
    point = recall.parse_point("32:4:8:48")
    assert point == {"S": 32, "pairs": 4, "batch": 8, "max_sequences": 48}
    cfg = recall.zoology_configs(size, 32)["mesh"]
    args = recall.zoology_parser().parse_args(["--eval-every", "16", "--test-queries", "64", "--warmup-sequences", "16"])
    protocol = recall.protocol_of(args, size, point)
    test = recall.held_out_set(point, 64, 64, 0, 0.01, False)
    whole = recall.zoology_run(cfg, point, 1e-2, 0, test, protocol, None, progress=False)
    assert [c["sequences"] for c in whole["curve"]] == [0, 16, 32, 48] and whole["stopped"] == "budget"

    evaluate, calls = recall.evaluate, []
    def killed_at_the_third(*a, **k):  # evaluations at 0, 16 (checkpoint written), then killed at 32
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(*a, **k)
    monkeypatch.setattr(recall, "evaluate", killed_at_the_third)
    partial = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        recall.zoology_run(cfg, point, 1e-2, 0, test, protocol, partial, progress=False)
    assert partial.exists()
    monkeypatch.setattr(recall, "evaluate", evaluate)
    resumed = recall.zoology_run(cfg, point, 1e-2, 0, test, protocol, partial, progress=False)
    for a, b in zip(resumed["curve"], whole["curve"], strict=True):
        assert a["sequences"] == b["sequences"] and a["accuracy"] == pytest.approx(b["accuracy"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_zoology_budgets_follow_vanilla_and_the_fastest_lr(tmp_path, monkeypatch):
    """Rows other than vanilla get budget_factor x vanilla's best sequences to 0.99; a row's later lrs get
    lr_factor x its fastest earlier lr's; a point where vanilla stays below 0.95 skips the other rows."""
    solves = {("vanilla", 3e-3): 64, ("mesh", 3e-3): 32}  # sequences to 0.99; the others never get there
    budgets = {}

    def fake_run(cfg, point, lr, seed, test, protocol, partial, progress=True, desc="", budget=None, device="cpu"):
        row = desc.split()[0]
        budgets[(point["S"], row, lr)] = budget
        n = solves.get((row, lr)) if point["S"] == 32 else None
        acc = 1.0 if n else 0.5
        return {"accuracy": acc, "best_accuracy": acc, "loss": 0.1, "sequences_to_95": n, "sequences_to_99": n,
                "sequences": n or budget, "steps": 1, "stopped": "reached 0.99" if n else "budget", "seconds": 1.0,
                "params": 1, "curve": [{"sequences": 0, "accuracy": 0.0, "loss": 1.0, "train_loss": None, "seconds": 0.0},
                                       {"sequences": n or budget, "accuracy": acc, "loss": 0.1, "train_loss": 0.1, "seconds": 1.0}]}
    monkeypatch.setattr(recall, "zoology_run", fake_run)
    result = recall.main(["--zoology", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-gate", "--rows",
                          "vanilla", "mesh", "--points", "32:4:8:480"])
    assert budgets == {(32, "vanilla", 3e-3): 480, (32, "vanilla", 1e-2): 128, (32, "mesh", 3e-3): 192,
                       (32, "mesh", 1e-2): 64}
    assert len(result["runs"]) == 4
    budgets.clear()
    recall.zoology_main(["--quick", "--threads", "1", "--out", str(tmp_path), "--rows", "vanilla", "mesh",
                         "--points", "34:4:8:48"])  # vanilla never reaches 0.95 at S=34: mesh is skipped
    assert set(budgets) == {(34, "vanilla", 3e-3), (34, "vanilla", 1e-2)}
