"""Train and evaluate a TMTModel on WikiText-2 (word level, local files) with the project's Trainer."""
import dataclasses
import time
from pathlib import Path
from typing import Dict

import torch

from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data import SequenceLoader, WordVocab, load_text_splits
from tmt_pyg.train import TrainConfig, Trainer, evaluate

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def load_wikitext(data_dir: Path = DEFAULT_DATA) -> Dict[str, torch.Tensor]:
    """Token streams of the train/validation/test splits and the vocabulary (33,278 words)."""
    splits = load_text_splits("wikitext-2", str(data_dir))
    vocab = WordVocab.build(splits["train"])
    return {"vocab": vocab, **{name: vocab.encode(lines) for name, lines in splits.items()}}


def train_lm(cfg: TMTConfig, data: Dict, train: TrainConfig, val_tokens: int) -> Dict:
    """Train ``TMTModel(cfg)``; return the model, the train wall time and the validation metrics."""
    torch.manual_seed(train.seed)
    model = TMTModel(cfg)
    val = data["validation"][:val_tokens]
    loaders = (SequenceLoader(data["train"], train.seq_len, train.batch_size, seed=train.seed),
               SequenceLoader(val, train.seq_len, train.batch_size, shuffle=False, drop_last=False))
    start = time.perf_counter()
    Trainer(model, *loaders, cfg=train).fit()
    seconds = time.perf_counter() - start
    return {"model": model, "train_seconds": seconds, "tokens": train.steps * train.batch_size * train.seq_len,
            "val": evaluate(model, loaders[1]), "val_loader": loaders[1]}


def describe(cfg: TMTConfig, train: TrainConfig) -> Dict:
    return {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(train)}
