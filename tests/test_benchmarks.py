"""The benchmark scripts run (--quick) and write complete, finite results, so they cannot rot."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks`

from benchmarks import (ablation, decode, exit_eval, exit_noise, exit_recipe, exit_sample, exit_speed, long_context_lm, long_decode, memory,  # noqa: E402
                        mesh_backends, point_cloud_speed, recall, search_scaling, shakespeare, slot_core, speculative,
                        speed)


def run_quick(module, tmp_path: Path) -> dict:
    returned = module.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / f"{module.NAME}.json").read_text())
    assert (tmp_path / f"{module.NAME}.png").stat().st_size > 0
    assert (tmp_path / f"{module.NAME}.md").read_text().startswith(f"## {module.NAME}")
    assert written["benchmark"] == module.NAME
    assert {"cpu", "torch", "torch_threads", "load_average_start", "load_average_end"} <= set(written["machine"])
    assert written["machine"]["torch_threads"] == 1
    assert json.loads(json.dumps(returned)) == written
    return written


def finite_positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_mesh_backends(tmp_path):
    result = run_quick(mesh_backends, tmp_path)
    rows = result["rows"]
    assert {(r["kind"], r["causal"]) for r in rows} == {("token states", False), ("token states", True),
                                                        ("points", False), ("points", True)}
    for r in rows:
        assert finite_positive(r["dense_ms"], r["cluster_ms"], r["cluster_over_dense"], r["edges"])
        assert r["same_edges"], f"backends disagree on {r}"
        assert r["auto"] in ("dense", "cluster")
    assert result["all_same_edges"] is True and isinstance(result["auto_rule_holds"], bool)


def test_exit_speed(tmp_path):
    result = run_quick(exit_speed, tmp_path)
    assert set(result["results"]) == {"default (mesh, anchors, dual stream)", "anchors off"}
    for rows in result["results"].values():
        assert [r["exit_fraction"] for r in rows] == list(exit_speed.FRACTIONS)
        for r in rows:
            assert finite_positive(r["median_ms"], r["flops"], r["time_ratio"], r["flop_ratio"], r["ideal_row_ratio"])
            S = r["rows_processed"][0]
            assert r["rows_processed"][1:] == [S - r["exited_tokens"]] * 3
        flops = [r["flops"] for r in rows]
        assert flops == sorted(flops, reverse=True) and rows[0]["flop_ratio"] == 1.0
    assert set(result["profiles"]) == {"0% exited", "50% exited"}
    for prof in result["profiles"].values():
        assert finite_positive(prof["total_ms"]) and prof["top_ops"]
        assert "mesh kNN" in {r["label"] for r in prof["breakdown"]}


def test_speed(tmp_path):
    result = run_quick(speed, tmp_path)
    assert {r["model"] for r in result["rows"]} == {"TMT", "TMT, anchors off", "TMT, 8 exploration slots", "mesh only",
                                                    "mesh only, pure kNN", "vanilla"}
    params = {r["params"] for r in result["rows"]}
    assert max(params) / min(params) < 1.02, "compared models must have matched parameter counts"
    for r in result["rows"]:
        assert finite_positive(r["train_tokens_per_s"], r["infer_tokens_per_s"], r["train_ms"], r["infer_ms"])
    assert all(finite_positive(r["train_ratio"], r["infer_ratio"]) for r in result["ratios"])
    assert all(finite_positive(c["ratio"]) and isinstance(c["holds"], bool) for c in result["checks"])
    assert {c["what"] for c in result["checks"]} >= {"train: anchors on / off time", "infer: anchors on / off time"}
    labels = {r["label"] for r in result["profiles"]["TMT"]["breakdown"]}
    assert {"forward", "backward", "optimizer", "mesh kNN", "anchor EMA update"} <= labels


def test_exit_recipe(tmp_path):
    result = run_quick(exit_recipe, tmp_path)
    models = [r["model"] for r in result["rows"]]
    assert models[0] == "vanilla" and result["rows"][0]["vs_vanilla"] == 1 and len(models) == 6
    assert all(finite_positive(r["step_ms"], r["vs_vanilla"]) for r in result["rows"])
    configs = result["configs"]
    every, tokens, layers = (configs[m] for m in models[-3:])  # every token, then --quick's recipes 16:0 and 0:1
    assert (every["exit_loss_sample"], tokens["exit_loss_sample"], layers["exit_loss_sample"]) == (0, 16, 0)
    assert (every["exit_loss_layers"], tokens["exit_loss_layers"], layers["exit_loss_layers"]) == (0, 0, 1)
    assert every["exit_loss_weight"] == tokens["exit_loss_weight"] == layers["exit_loss_weight"] > 0
    for bad in ("0:0", "512", "a:1", "-1:1"):
        with pytest.raises(SystemExit):
            exit_recipe.main(["--quick", "--out", str(tmp_path / "bad"), "--recipes", bad])


def test_exit_noise(tmp_path):
    result = run_quick(exit_noise, tmp_path)
    rows = {r["part"]: r for r in result["rows"]}
    assert list(rows)[-1] == "all" and {"embedding and head", "block 0", "block 1"} <= set(rows)
    last = rows[f"block {result['config']['n_layers'] - 1}"]
    assert last["exit_grad_sq"] == last["sampling_noise"] == 0 < last["minibatch_noise"]  # no exit reads the last block
    assert all(finite_positive(rows[p]["sampling_noise"], rows[p]["minibatch_noise"]) for p in ("block 0", "all"))
    assert result["bias_sq"] < 3 * result["bias_sq_expected"]  # unbiased: the draws' mean misses by their spread only
    layers = exit_noise.main(["--quick", "--threads", "1", "--out", str(tmp_path / "layers"), "--sample", "0", "--layers", "1"])
    assert 0 < layers["bias_sq"] < 3 * layers["bias_sq_expected"]  # one drawn layer, every token: unbiased too
    with pytest.raises(ValueError, match="nothing to sample"):
        exit_noise.main(["--quick", "--threads", "1", "--out", str(tmp_path / "none"), "--sample", "0"])


def test_exit_sample(tmp_path, data_dir):  # data_dir: skipped where the shared corpora are missing
    result = run_quick(exit_sample, tmp_path)
    assert [r["variant"] for r in result["rows"]] == list(exit_sample.QUICK_VARIANTS)
    assert all(finite_positive(r["val_ppl"]) and r["seeds"] == [0] for r in result["rows"])
    runs = sorted((tmp_path / "exit_sample_runs").glob("*.json"))
    assert len(runs) == len(exit_sample.QUICK_VARIANTS)
    stamps = [p.stat().st_mtime_ns for p in runs]
    again = exit_sample.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--table-only"])
    assert again["rows"] == result["rows"] and [p.stat().st_mtime_ns for p in runs] == stamps, "cached runs are read back"


def test_decode(tmp_path):
    result = run_quick(decode, tmp_path)
    assert {(r["model"], r["B"]) for r in result["rows"]} == {
        (m, b) for m in ("TMT", "vanilla (TMT decoder)", "TMT (compiled step)", "vanilla (TMT decoder) (compiled step)",
                         decode.GPT2, decode.GPT2_STATIC) for b in (1, 2)}
    assert all(finite_positive(r["tokens_per_s"], r["params"], r["first_call_ms"]) for r in result["rows"])
    assert [c["B"] for c in result["checks"]] == [1, 2] and all(finite_positive(c["ratio"]) for c in result["checks"])


def test_exit_eval(tmp_path):
    result = run_quick(exit_eval, tmp_path)
    off, at_tau = result["points"].values()
    assert off["work_fraction"] == 1.0 and 0 < at_tau["work_fraction"] <= 1.0
    check = result["check"]
    assert finite_positive(check["time_ratio"]) and check["target"] == at_tau["work_fraction"] + exit_eval.SLACK


def test_recall(tmp_path):
    result = run_quick(recall, tmp_path)
    assert {r["model"] for r in result["rows"]} == {"vanilla", "mesh (pure kNN)", "mesh + window 8", "attention mesh",
                                                    "attention mesh + window 8"}
    params = {r["params"] for r in result["rows"]}
    assert max(params) / min(params) < 1.02
    assert all(0 <= r["accuracy"] <= 1 and finite_positive(r["loss"]) for r in result["rows"])


def test_mqar_sequences_hold_their_answers():
    ids, answer = recall.mqar_batch(16, 40, 6, 64, torch.Generator().manual_seed(0))
    assert int(answer.sum()) == 16 * 6 and not bool(answer[:, :12].any())
    for row, mask in zip(ids, answer):
        pairs = dict(zip(row[0:12:2].tolist(), row[1:12:2].tolist()))
        asked = row[mask].tolist()
        assert sorted(asked) == sorted(pairs) and all(row[i + 1] == pairs[int(row[i])] for i in mask.nonzero().view(-1))
        assert all(32 <= v < 64 for v in pairs.values()) and all(1 <= k < 32 for k in pairs)


def test_memory(tmp_path):
    result = run_quick(memory, tmp_path)
    assert {(r["model"], r["S"]) for r in result["rows"]} == {(m, s) for m in ("TMT", "TMT, routed search", "vanilla") for s in (128, 256)}
    for r in result["rows"]:
        assert finite_positive(r["process_peak_bytes"], r["rss_before_bytes"], r["step_seconds"])
        assert r["step_peak_bytes"] >= 0
    assert all(math.isfinite(v) and v >= 0 for v in result["ratios"].values())


def test_ablation(tmp_path, data_dir):  # data_dir: skipped where the shared corpora are missing
    swept = ablation.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--sweep"])
    assert set(swept["sweep"]) == set(ablation.MULTI_SEED) and all(len(v) == len(ablation.SWEEP_LRS) for v in swept["sweep"].values())
    result = run_quick(ablation, tmp_path)
    assert result["sweep"] == json.loads(json.dumps(swept["sweep"])), "the study reads the cached sweep"  # the report's keys are strings
    assert result["lrs"]["vanilla"] == swept["best"]["vanilla"], "the study takes the sweep's lr"
    assert result["lrs"]["mesh"] == swept["best"]["full"]
    rows = result["rows"]
    # --quick models have 2 layers: the 3-layer vanilla is left out, the 2-layer one is vanilla's config
    assert list(rows) == list(ablation.ROWS) + ["vanilla, 2 layers", "full, sampled exit loss", "full, drawn-layer exit loss"]
    params = [r["params"] for row, r in rows.items() if row in ablation.ROWS or row.startswith("full")]
    assert max(params) / min(params) < 1.02, "ablation rows must have matched parameter counts"
    assert all(finite_positive(r["mflops_per_token"]) for r in rows.values()), "every new run counts its FLOPs"
    assert len(rows["vanilla"]["seeds"]) == len(rows["full"]["seeds"]) == 2 and len(rows["mesh"]["seeds"]) == 1
    assert all(finite_positive(r["test_ppl"], r["val_ppl"], r["work_fraction"]) for r in rows.values())
    exit_rows = {row for row, parts in ablation.ROWS.items() if "use_exit" in parts} | {"full, sampled exit loss", "full, drawn-layer exit loss"}
    assert all(finite_positive(rows[row]["test_ppl_exits_off"], rows[row]["eval_time_vs_off"]) for row in exit_rows)
    assert all(rows[row]["test_ppl_exits_off"] is None and rows[row]["work_fraction"] == 1 for row in set(rows) - exit_rows)
    for run in result["runs"]:
        cfg = run["model"]
        assert cfg["exit_loss_weight"] == (0.5 if cfg["use_exit"] else 0.0), "exit rows train with the exit recipe"
        assert cfg["exit_loss_sample"] == {"full, sampled exit loss": 512, "full, drawn-layer exit loss": 2048}.get(run["row"], 0)
        assert cfg["exit_loss_layers"] == (1 if run["row"] == "full, drawn-layer exit loss" else 0)
        assert cfg["mesh_similarity"] == "attention" and cfg["mesh_window"] == 8, "rows are today's defaults"
        if cfg["use_exit"]:
            curve = run["exits"]["curve"]
            assert run["exits"]["tau"] in [p["tau"] for p in curve]
            assert all(0 < p["work_fraction"] <= 1 and finite_positive(p["ppl"], p["time_vs_off"]) for p in curve)
            fewest = min(curve, key=lambda p: p["work_fraction"])  # exits only take rows away: never more FLOPs
            assert fewest["flops_per_token"] <= run["test"]["flops_per_token"] * (1 + 1e-9)
    effect = result["interaction"]
    assert effect["interaction"] == pytest.approx(effect["full_gain"] - effect["sum_of_single_gains"])
    assert effect["sum_of_single_gains"] == pytest.approx(sum(effect["gains"][r] for r in ablation.SINGLES))
    cached = sorted(p.name for p in (tmp_path / "ablation_runs" / "results").glob("*.json"))
    assert len(cached) == len(rows) + 2, "every finished run keeps its result"
    again = ablation.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--table-only"])
    assert again["rows"] == result["rows"], "cached runs must reproduce the table without training"
    assert all(r["eval_ms"] is None for r in rows.values()), "no row timed side by side yet"
    timed = ablation.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--time-rows"])["rows"]
    assert all(finite_positive(r["eval_ms"]) for r in timed.values())
    assert (tmp_path / "ablation_runs" / "results" / "row_eval_times.json").exists()
    kept = ablation.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--table-only"])["rows"]
    assert kept == timed, "the side-by-side times are kept for the table"
    stale = next(p for p in (tmp_path / "ablation_runs" / "results").glob("exit_seed*.json"))
    run = json.loads(stale.read_text())
    run["exits"]["timed_at"] = 0  # as if timed before the evaluation fix
    stale.write_text(json.dumps(run))
    others = {p: p.read_text() for p in stale.parent.glob("*.json") if p != stale}
    retimed = ablation.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--retime"])
    run = json.loads(stale.read_text())
    assert run["exits"]["timed_at"] >= ablation.RETIMED_AFTER, "a stale run is timed again from its final checkpoint"
    assert all(finite_positive(p["time_vs_off"]) for p in run["exits"]["curve"])
    assert run["exits"]["at_tau"]["tau"] == run["exits"]["tau"]
    assert all(p.read_text() == text for p, text in others.items()), "runs timed since the fix are left alone"
    assert retimed["rows"]["exit"]["test_ppl"] == result["rows"]["exit"]["test_ppl"], "retiming keeps the PPLs"
    for path in stale.parent.glob("vanilla_seed*.json"):  # as if trained before FLOPs were counted
        run = json.loads(path.read_text())
        del run["test"]["flops_per_token"]
        path.write_text(json.dumps(run))
    filled = ablation.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--table-only"])["rows"]
    # a row without exits counts the same FLOPs whatever its weights: the side-by-side timing's count stands in
    assert filled["vanilla"]["mflops_per_token"] == pytest.approx(timed["vanilla"]["mflops_per_token"], rel=0.02)
    for path in stale.parent.glob("full_seed*.json"):  # exit runs as if made before FLOPs were counted
        run = json.loads(path.read_text())
        for point in [run["test"], run["exits"]["at_tau"], *run["exits"]["curve"]]:
            del point["flops_per_token"]
        path.write_text(json.dumps(run))
    filled = ablation.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--table-only"])["rows"]
    # the sampled-loss run has the same architecture: its count, read at the full runs' work fractions, is theirs
    assert filled["full"]["mflops_from_work"] and not timed["full"]["mflops_from_work"]
    assert filled["full"]["mflops_per_token"] == pytest.approx(timed["full"]["mflops_per_token"], rel=1e-3)


def test_counted_flops_filled_from_the_work_fraction():
    def run(identity, points, counted):
        pts = [{"work_fraction": w, **({"flops_per_token": 1e6 + 3e6 * w + bend * w * w} if counted else {})}
               for w, bend in points]
        return {"identity": identity, "test": pts[0], "exits": {"at_tau": pts[1], "curve": pts[1:]}}
    line = [(1.0, 0), (0.8, 0), (0.6, 0)]
    ref, old = run({"n": 4, "exit_loss_sample": 512}, line, True), run({"n": 4}, [(1.0, 0), (0.7, 0)], False)
    other = run({"n": 8}, [(1.0, 0), (0.7, 0)], False)
    ablation.fill_counted_flops([ref, old, other])
    assert old["exits"]["at_tau"]["flops_per_token"] == pytest.approx(1e6 + 3e6 * 0.7) and old["test"]["flops_from_work"]
    assert "flops_per_token" not in other["test"], "another architecture's count is not borrowed"
    bent, old = run({"n": 4}, [(1.0, 0), (0.8, 5e5), (0.6, 0)], True), run({"n": 4}, [(1.0, 0), (0.7, 0)], False)
    ablation.fill_counted_flops([bent, old])
    assert "flops_per_token" not in old["test"], "a count that is not linear in the work is not extrapolated"


def test_work_at_a_ppl_rise_reads_the_tau_curve():
    run = {"test": {"ppl": 100.0}, "exits": {"curve": [{"work_fraction": 0.8, "ppl": 104.0}, {"work_fraction": 0.9, "ppl": 101.0}]}}
    assert ablation.work_at_ppl_rise(run) == pytest.approx(0.9 - 0.1 / 3)  # +2 % is crossed between 0.9 and 0.8
    assert ablation.work_at_ppl_rise(run, rise=0.05) == 0.8  # never crossed: the curve's last point
    assert ablation.work_at_ppl_rise(run, rise=0.005) == pytest.approx(0.95)  # crossed before the first tau point


def test_ablation_word_ppl():
    """Subword losses convert to word PPL through the total NLL: the loss per subword times subwords per word."""
    split = {"ids": torch.zeros(300, dtype=torch.long), "words": 200}
    assert ablation.word_ppl(2.0, split) == pytest.approx(math.exp(3.0))


def test_shakespeare(tmp_path):
    result = run_quick(shakespeare, tmp_path)
    rows = result["rows"]
    assert set(rows) == {"vanilla", "tmt-exit"} and rows["vanilla"]["params"] / rows["tmt-exit"]["params"] > 0.98
    exits = rows["tmt-exit"]
    assert exits["report_exits"]["loss"] <= exits["report_exits_off"]["loss"] * 1.02 + 1e-6 or exits["tau"] == [1.0]
    assert finite_positive(*result["flops_per_token"].values(), *result["eval_seconds"].values())
    assert set(result["eval_seconds"]) == {"vanilla", "tmt-exit", "tmt-exit @tau"}


def test_slot_core(tmp_path):
    result = run_quick(slot_core, tmp_path)
    assert {r["core"] for r in result["rows"]} == {"fused causal SDPA", "slots, eager", slot_core.FUSED}
    assert all(finite_positive(r["forward_ms"], r["forward_backward_ms"]) for r in result["rows"])
    assert {c["what"] for c in result["checks"]} == set(slot_core.TARGETS)


def test_search_scaling(tmp_path):
    result = run_quick(search_scaling, tmp_path)
    models = {(r["S"], r["model"]) for r in result["rows"]}
    assert models == {(128, n) for n in search_scaling.configs({}).keys()} | {(256, "vanilla"), (256, "TMT, routed search")}
    assert all(finite_positive(r["infer_tokens_per_s"], r["train_tokens_per_s"]) for r in result["rows"])
    assert [s["S"] for s in result["search"]] == [128] and finite_positive(result["search"][0]["routed"])
    assert {(c["S"], c["what"]) for c in result["checks"]} == set()  # the quick sizes carry no targets


def test_long_context_lm(tmp_path, data_dir):  # data_dir: skipped where the shared corpora are missing
    result = long_context_lm.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--data-dir", str(data_dir)])
    assert json.loads((tmp_path / "long_context_lm.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "long_context_lm.png").stat().st_size > 0
    rows = result["rows"]
    assert list(rows) == list(long_context_lm.ROWS)
    assert max(r["params"] for r in rows.values()) / min(r["params"] for r in rows.values()) < 1.02
    assert all(finite_positive(r["val_loss"], r["train_seconds"]) for r in rows.values())
    assert set(result["gate"]) == {"tmt-exact", "tmt-routed"}
    per_top = result["recall"]["per_route_top"]
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in per_top.values())
    assert per_top[max(per_top, key=int)] == [1.0, 1.0], "routed to every earlier block, the search is exact"


def test_speculative(tmp_path):
    result = run_quick(speculative, tmp_path)
    plain = [r for r in result["rows"] if r["draft_layers"] is None]
    assert [r["B"] for r in plain] == [1, 2] and all(r["speedup"] == 1.0 for r in plain)
    drafted = [r for r in result["rows"] if r["draft_layers"] is not None]
    assert {(r["B"], r["draft_layers"]) for r in drafted} == {(B, E) for B in (1, 2) for E in (1, 2)}
    assert all(0 <= r["acceptance"] <= 1 and finite_positive(r["tokens_per_s"]) for r in drafted)
    assert [c["B"] for c in result["checks"]] == [1]


def test_long_decode(tmp_path):
    result = run_quick(long_decode, tmp_path)
    assert {r["model"] for r in result["rows"]} == {"vanilla", "TMT, exact search", "TMT, exact search, 1 head", "TMT, routed search"}
    assert all(finite_positive(r["tokens_per_s"], r["prefill_s"]) and r["prompt"] == 96 for r in result["rows"])
    assert result["checks"] == []  # the quick prompt carries no target


def test_point_cloud_speed(tmp_path):
    """The point-cloud nets timed alternately; DGCNN is the unit."""
    result = run_quick(point_cloud_speed, tmp_path)
    rows = result["rows"]
    assert list(rows) == ["mesh", "mesh + relative positions", "mesh + relative features", "DGCNN"]
    assert rows["DGCNN"]["vs_dgcnn"] == 1.0
    assert all(finite_positive(r["step_ms"], r["epoch_s"], r["params"]) for r in rows.values())
    assert rows["mesh + relative positions"]["params"] > rows["mesh"]["params"]  # same width here: the encoders add
