"""Language modelling on WikiText-2 with the Python API: load the corpus through `datasets` (local
files offline, the hub online), train a TMT with the project's Trainer, report word-level test
perplexity with the work the exit gates saved, and sample a continuation with per-layer caches.

    python examples/wikitext_lm.py --data-dir path/to/wikitext-2           # offline, ~15 min on 2 cores
    python examples/wikitext_lm.py                                           # online: wikitext-2-v1 from the hub
    python examples/wikitext_lm.py --quick --data-dir path/to/wikitext-2     # tiny (tests)
"""
import argparse
from typing import Dict

import torch

from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data.corpus import load_data, make_loader
from tmt_pyg.train import TrainConfig, Trainer, evaluate


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="folder with train.txt/valid.txt/test.txt (default: the HuggingFace hub)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/wikitext_lm")
    p.add_argument("--prompt", default="the game was released in")
    p.add_argument("--quick", action="store_true", help="tiny model and a few steps, for tests")
    args = p.parse_args(argv)
    size = dict(d_model=128, n_heads=4, n_layers=4, ffn_stream_dim=256)
    if args.quick:
        size, args.steps, args.seq_len, args.batch_size = dict(d_model=32, n_heads=2, n_layers=2, ffn_stream_dim=32), 4, 32, 4

    cfg = TrainConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=2e-3,
                      warmup=max(1, args.steps // 20), eval_every=max(1, args.steps // 3), out_dir=args.out,
                      progress=not args.quick)
    vocab, data = load_data("wikitext-2", args.data_dir, ("train", "validation", "test"))  # 33,278 words incl. <eos>
    (train, _), (valid, _), (test, _) = (data[s] for s in ("train", "validation", "test"))
    if args.quick:
        valid, test = valid[:2048], test[:2048]
    loader = make_loader(train, None, cfg, train=True)
    val_loader, test_loader = (make_loader(s, None, cfg, train=False) for s in (valid, test))

    model = TMTModel(TMTConfig(vocab_size=len(vocab), max_seq_len=args.seq_len, graph_k=8, **size))
    print(f"TMT with {model.num_parameters():,} parameters; {len(train):,} training tokens, vocabulary {len(vocab):,}")
    Trainer(model, loader, val_loader, cfg=cfg).fit()

    result = evaluate(model, test_loader)
    print(f"test PPL {result['ppl']:.1f} over {result['targets']:,} targets; exit rate {result['exit_rate']:.2f}, "
          f"work fraction {result['work_fraction']:.2f} (layer-token rows actually processed)")
    prompt = vocab.encode([args.prompt])[:-1].unsqueeze(0)  # drop the line's <eos>
    sample = model.eval().generate(prompt, max_new_tokens=20, top_k=40, generator=torch.Generator().manual_seed(0))
    result["sample"] = vocab.decode(sample[0])
    print("sample:", result["sample"])
    return result


if __name__ == "__main__":
    main()
