"""The language model is pinned: its state-dict keys and shapes and its outputs on fixed inputs equal a
fingerprint recorded from an earlier version, so a change of the generic layers' defaults (the graph
user's) cannot silently change the model. Regenerate only for an intended change of the model:

    python tests/test_lm_unchanged.py --write
"""
import json
import sys
from pathlib import Path

import torch

FINGERPRINT = Path(__file__).with_name("lm_fingerprint.json")
CONFIGS = {  # the shipped default (every part on), the message-passing path, the routed search
    "default": dict(),
    "message_passing": dict(message_passing=True),
    "routed": dict(mesh_search="routed", route_block=4, route_top=2),
}
SMALL = dict(vocab_size=40, d_model=16, n_heads=2, n_layers=3, graph_k=3, ffn_stream_dim=16, memory_anchors=2,
             max_seq_len=32, dropout=0.0, exit_loss_weight=0.5)


def fingerprint() -> dict:
    """State-dict shapes and outputs of each config: train loss, a sample of eval logits (x100) at an
    exit threshold that lets tokens exit, of a ragged input, and a short greedy continuation."""
    from tmt_pyg import TMTConfig, TMTModel
    result = {}
    for name, overrides in CONFIGS.items():
        torch.manual_seed(0)
        model = TMTModel(TMTConfig(**SMALL, **overrides))
        ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(1))
        train = model.train()(ids, compute_loss=True)
        model.eval().config.exit_threshold = 1.0  # no exits: read the gates' confidences
        with torch.no_grad():
            model.config.exit_threshold = float(model(ids).confidences[0].median())  # about half exit after layer 0
            full, ragged = model(ids), model([ids[0, :13], ids[1, :7]])
        result[name] = {
            "state_dict": {key: list(value.shape) for key, value in model.state_dict().items()},
            "train_loss": round(float(train.loss.detach()), 4),
            "eval_logits": [round(v, 5) for v in (full.logits[:, ::3, :4] * 100).flatten().tolist()],
            "eval_work_fraction": round(float(full.work_fraction), 4),
            "ragged_logits": [round(v, 5) for v in (ragged.logits[::3, :4] * 100).flatten().tolist()],
            "greedy": model.generate(ids[:1, :5], max_new_tokens=6, temperature=0)[0].tolist(),
        }
    return result


def test_language_model_matches_its_fingerprint():
    expected, seen = json.loads(FINGERPRINT.read_text()), fingerprint()
    for name in CONFIGS:
        assert seen[name]["state_dict"] == expected[name]["state_dict"], name
        for key in ("train_loss", "eval_work_fraction"):
            assert abs(seen[name][key] - expected[name][key]) < 2e-4, (name, key)
        for key in ("eval_logits", "ragged_logits"):
            torch.testing.assert_close(torch.tensor(seen[name][key]), torch.tensor(expected[name][key]), atol=2e-4, rtol=1e-4)
        assert seen[name]["greedy"] == expected[name]["greedy"], name


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FINGERPRINT.write_text(json.dumps(fingerprint(), indent=1).replace("\n    ", " ").replace("\n   ]", "]").replace("\n   ", " ").replace("\n  ]", "]") + "\n")
