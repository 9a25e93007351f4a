import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tmt_pyg.data import SequenceLoader, associative_recall_corpus, tokens_to_batch
from tmt_pyg.models import TMTConfig, TMTModel
from tmt_pyg.train import (Trainer, TrainConfig, evaluate, list_checkpoints, load_checkpoint, lr_at, read_metrics,
                           save_checkpoint, seed_everything)


def make_trainer(out_dir, steps=6, model_overrides=None, **overrides):
    """Tiny TMT (dropout on) on a corpus of 10 batches per epoch: 6 steps x 2 micro-batches cross an epoch."""
    train, val = associative_recall_corpus(1280, seed=0), associative_recall_corpus(512, seed=1)
    cfg = dataclasses.replace(TrainConfig(steps=steps, batch_size=4, seq_len=32, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup=2,
                                          eval_every=3, out_dir=str(out_dir), device="cpu", progress=False), **overrides)
    seed_everything(cfg.seed)
    model = TMTModel(dataclasses.replace(TMTConfig(vocab_size=train.vocab_size, d_model=32, n_heads=2, n_layers=2, graph_k=4,
                                                   ffn_stream_dim=32, memory_anchors=4, max_seq_len=32, dropout=0.1),
                                         **(model_overrides or {})))
    loaders = [SequenceLoader(c.tokens, 32, 4, shuffle=shuffle, seed=cfg.seed, drop_last=shuffle,
                              node_fields={"answer_mask": c.answer_mask}) for c, shuffle in ((train, True), (val, False))]
    return Trainer(model, *loaders, cfg, extra={"note": "test"})


def test_resume_is_exact(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.fit()
    first = make_trainer(tmp_path / "split")
    first.fit(stop_at=3)
    assert first.step == 3 and len(list_checkpoints(tmp_path / "split" / "checkpoints")) == 1
    torch.manual_seed(12345)  # a new process would start from other RNG states
    second = make_trainer(tmp_path / "split")
    assert second.resume() and second.step == 3
    second.fit()
    assert second.train_loader.state_dict() == straight.train_loader.state_dict()
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    val_a = [r for r in read_metrics(straight.metrics_path) if r["split"] == "val"]
    val_b = [r for r in read_metrics(second.metrics_path) if r["split"] == "val"]
    assert [r["loss"] for r in val_a] == [r["loss"] for r in val_b]


def test_resume_without_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.resume() is False
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.resume(tmp_path / "missing")


def test_checkpoint_atomic_keep_last(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, step, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000004.pt", "step_00000005.pt"]
    assert load_checkpoint(tmp_path)["step"] == 5

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):  # a failed write leaves no partial or temp file behind
        save_checkpoint({"step": 6, "bad": Unpicklable()}, tmp_path, 6, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing_here")


def test_lr_schedule_shape():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then monotone cosine decay
    assert lrs[55] == pytest.approx(0.55) and lrs[100] == pytest.approx(0.1)


def test_metrics_plots_and_checkpoint_contents(tmp_path):
    trainer = make_trainer(tmp_path, keep_last=1)
    result = trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert [r["lr"] for r in train] == pytest.approx([lr_at(s, trainer.cfg) for s in range(6)])
    assert all(r["tokens"] == 2 * 4 * 32 and r["tok_per_s"] > 0 for r in train)
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6] and val[-1] == {"split": "val", "step": 6, **result}
    assert 0.0 <= result["recall_acc"] <= 1.0 and result["ppl"] > 1.0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [ckpt] = list_checkpoints(tmp_path / "checkpoints")
    state = load_checkpoint(ckpt)
    assert {"model", "optimizer", "scheduler", "step", "loader", "rng", "model_config", "train_config", "extra"} <= set(state)
    assert state["step"] == 6 and state["extra"] == {"note": "test"}
    assert TMTConfig(**state["model_config"]) == trainer.model.config
    assert TrainConfig(**state["train_config"]) == trainer.cfg


def test_evaluate_recall_accuracy():
    """An oracle that always predicts the next token gets recall 1 and loss ~0; batches never leak across sequences."""
    class Oracle(torch.nn.Module):
        def forward(self, batch):
            logits = F.one_hot(torch.roll(batch.input_ids, -1), 10).float() * 50
            return SimpleNamespace(logits=logits, exit_rate=torch.tensor(0.0), work_fraction=torch.tensor(1.0))

    ids = torch.randint(10, (2, 8))
    batch = tokens_to_batch(ids)
    batch.answer_mask = torch.zeros(16, dtype=torch.bool)
    batch.answer_mask[[3, 8, 12]] = True  # 8 starts sequence 2: nothing predicts it, so it is not scored
    result = evaluate(Oracle(), [batch])
    assert result["recall_acc"] == 1.0 and result["loss"] < 1e-6 and result["targets"] == 14


def test_evaluate_scores_the_lm_loss_without_the_training_losses(monkeypatch):
    """evaluate's loss is the token-weighted LM loss of the forward (ragged batches too), and it computes
    neither the early-exit loss nor the gate objective (their heads would be timed as evaluation)."""
    torch.manual_seed(0)
    model = TMTModel(TMTConfig(vocab_size=20, d_model=32, n_heads=2, n_layers=3, graph_k=4, ffn_stream_dim=32,
                               memory_anchors=4, max_seq_len=16, exit_loss_weight=0.5, exit_threshold=0.5)).eval()
    for block in model.blocks[:-1]:  # gates that fire on some tokens
        torch.nn.init.normal_(block.exit_gate.lin.weight, std=1.0)
        torch.nn.init.zeros_(block.exit_gate.lin.bias)
    batches = [tokens_to_batch([torch.randint(20, (n,)) for n in lengths]) for lengths in ((16, 5, 9), (12, 2))]
    with torch.no_grad():
        refs = [model(b, compute_loss=True) for b in batches]
    counts = [int((b.batch[1:] == b.batch[:-1]).sum()) for b in batches]
    expected = sum(float(r.lm_loss) * n for r, n in zip(refs, counts)) / sum(counts)
    for name in ("_exit_loss", "_gate_loss"):
        monkeypatch.setattr(model, name, lambda *a, name=name: pytest.fail(f"evaluate computed {name}"))
    result = evaluate(model, batches)
    assert result["targets"] == sum(counts) and result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["work_fraction"] < 1  # the exits acted


@pytest.mark.parametrize("apart", [True, False])
def test_detached_gates_leave_the_trunk_step_alone_only_when_clipped_apart(tmp_path, apart):
    """The gates' gradients, inside one global clipping norm, shrink the trunk's step although the
    gates read detached states; clipped apart, the trunk takes the same step as with no gate loss."""
    trunk = {}
    for weight in (0.0, 1000.0):
        trainer = make_trainer(tmp_path / f"{apart}{weight}", steps=3, clip_gates_apart=apart, grad_accum=1,
                               model_overrides=dict(gate_detach=True, gate_loss_weight=weight, dropout=0.0))
        batches = trainer._batches()
        for _ in range(3):  # AdamW's first step ignores a common scale of the gradients; later ones do not
            record = trainer.train_step(batches)
        trunk[weight] = torch.cat([p.detach().flatten() for n, p in trainer.model.named_parameters() if "exit_gate" not in n])
        assert record["gate_grad_norm"] > 0 if apart and weight else True
    assert torch.equal(trunk[0.0], trunk[1000.0]) == apart
