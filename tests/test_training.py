import math

import torch

from tmt_pyg import TMTConfig, TMTModel, tokens_to_batch


def test_short_training_beats_the_unigram_entropy(data_dir):
    """A tiny TMT trained for a few hundred steps on a slice of Tiny Shakespeare ends clearly below
    the unigram entropy of that slice (the best loss without any context)."""
    text = (data_dir / "tinyshakespeare" / "train.txt").read_text()[:60_000]
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    train, val = data[:54_000], data[54_000:]
    counts = torch.bincount(train, minlength=len(chars)).float()
    p = counts / counts.sum()
    unigram_entropy = float(-(p[p > 0] * p[p > 0].log()).sum())  # nats

    torch.manual_seed(0)
    cfg = TMTConfig(vocab_size=len(chars), d_model=64, n_heads=4, n_layers=2, graph_k=8, ffn_stream_dim=96,
                    memory_anchors=4, max_seq_len=64, dropout=0.0)
    model = TMTModel(cfg)
    opt = model.configure_optimizers(weight_decay=0.01, learning_rate=3e-3)
    S, B = 64, 16
    for step in range(250):
        idx = torch.randint(0, train.numel() - S, (B,))
        batch = tokens_to_batch(torch.stack([train[i:i + S] for i in idx]))
        loss = model(batch, compute_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    windows = val[: (val.numel() // S) * S].view(-1, S)
    with torch.no_grad():
        val_loss = float(model(tokens_to_batch(windows), compute_loss=True).lm_loss)
    assert math.isfinite(val_loss)
    assert val_loss < unigram_entropy - 0.4, (val_loss, unigram_entropy)
