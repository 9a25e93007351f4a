"""Byte-level BPE for raw text: load a ``transformers`` tokenizer or train one and cache it."""
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor


class HFTokenizer:
    """A ``transformers`` tokenizer with the ``encode(lines)`` / ``decode(ids)`` interface of ``WordVocab``.

    Every line is encoded followed by ``"\\n"``, so ``decode(encode(lines))`` is the original text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, lines: Iterable[str]) -> Tensor:
        ids = self.tokenizer([line + "\n" for line in lines], add_special_tokens=False)["input_ids"]
        return torch.tensor([i for line in ids for i in line], dtype=torch.long)

    def decode(self, ids: Union[Tensor, list[int]]) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def train_bpe(lines: list[str], vocab_size: int):
    """Train a byte-level BPE (GPT-2 style, ``<|endoftext|>`` special) and wrap it as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} must exceed {len(alphabet) + 1} (256 bytes + <|endoftext|>)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator((line + "\n" for line in lines), trainer, length=len(lines))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def load_or_train_bpe(lines: list[str], vocab_size: int, cache_dir: Union[str, Path],
                      name_or_path: Optional[str] = None) -> HFTokenizer:
    """``AutoTokenizer.from_pretrained(name_or_path)`` if given (a local folder works offline); otherwise a
    byte-level BPE trained on ``lines``, saved under ``cache_dir`` (keyed by ``vocab_size`` and a hash of
    ``lines``) and loaded from there on later calls."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path is not None:
        return HFTokenizer(AutoTokenizer.from_pretrained(name_or_path))
    digest = hashlib.sha1("\n".join(lines).encode("utf-8")).hexdigest()[:16]
    path = Path(cache_dir) / f"bpe-{vocab_size}-{digest}"
    if not (path / "tokenizer.json").is_file():
        # Save to a private folder first: concurrent processes (DDP ranks) never see a half-written one.
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        train_bpe(lines, vocab_size).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process got there first
            shutil.rmtree(tmp)
    return HFTokenizer(PreTrainedTokenizerFast.from_pretrained(path))
