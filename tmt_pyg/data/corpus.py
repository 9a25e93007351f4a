"""Corpora by name, their tokenizers and loaders: what the CLI, the examples and checkpoints share."""
from pathlib import Path
from typing import Dict, Optional, Tuple

from .loader import SequenceLoader
from .synthetic import associative_recall_corpus
from .text import CharVocab, WordVocab, load_text_splits
from .tokenizer import HFTokenizer, load_or_train_bpe

SHIPPED = Path(__file__).resolve().parent / "corpora"  # corpora inside the package: tinyshakespeare/
SYNTHETIC_SEEDS = {"train": 0, "validation": 1, "test": 2}  # fixed streams, independent of the training seed
DEFAULT_TOKENIZER = {"synthetic": "word", "wikitext-2": "word", "wikitext-2-raw-v1": "bpe", "tinyshakespeare": "char",
                     "text": "bpe"}


def tokenizer_state(tok) -> dict:
    """A checkpoint-friendly description of a WordVocab / CharVocab / HFTokenizer."""
    if isinstance(tok, WordVocab):
        return {"kind": type(tok).__name__, "itos": tok.itos, "eos": tok.eos, "unk": tok.unk}
    fast = tok.tokenizer
    if not getattr(fast, "is_fast", False):
        raise ValueError("only fast (tokenizers-backed) HF tokenizers can be stored in a checkpoint")
    return {"kind": "HFTokenizer", "json": fast.backend_tokenizer.to_str(), "special": fast.special_tokens_map}


def tokenizer_from_state(state: dict):
    """The tokenizer that :func:`tokenizer_state` described."""
    if state["kind"] in ("WordVocab", "CharVocab"):
        cls = WordVocab if state["kind"] == "WordVocab" else CharVocab
        return cls(state["itos"], state["eos"], state["unk"])
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state["json"]), **state["special"]))


def load_data(dataset: str, data_dir: Optional[str], splits: tuple, tok=None, tokenizer: str = "auto",
              bpe_vocab_size: int = 8192, synthetic_tokens: int = 400_000, cache_dir: str = "runs") -> Tuple[object, Dict]:
    """Returns ``(tokenizer, {split: (stream, node_fields)})``; builds the tokenizer on the training text unless given.

    ``dataset`` is a key of :data:`DEFAULT_TOKENIZER`; ``tokenizer`` is ``auto`` (that default), ``word``,
    ``char``, ``bpe`` or the path of a local HF tokenizer. A ``word`` vocabulary holds the words of the training
    split (others read as ``<unk>``), a ``char`` vocabulary every character of every split the corpus has (train,
    validation, test), a BPE is trained on the training split. The synthetic corpus has no line ends: its
    query marker ``<q>`` stands in as the vocabulary's ``eos``.
    """
    if dataset == "synthetic":
        out = {}
        for split in splits:
            c = associative_recall_corpus(synthetic_tokens if split == "train" else max(synthetic_tokens // 8, 8192),
                                          seed=SYNTHETIC_SEEDS[split])
            out[split] = (c.tokens, {"answer_mask": c.answer_mask})
        return tok or WordVocab(c.itos, eos="<q>", unk=None), out
    if data_dir is None and (SHIPPED / dataset).is_dir():  # shipped with the package: no network needed
        data_dir = str(SHIPPED)
    lines = load_text_splits(dataset, data_dir)
    if "validation" not in lines:  # carve 5% off the end of train.txt
        cut = len(lines["train"]) * 19 // 20
        lines["train"], lines["validation"] = lines["train"][:cut], lines["train"][cut:]
    for split in splits:
        if split not in lines:
            raise FileNotFoundError(f"dataset {dataset!r} has no {split!r} split (have: {sorted(lines)})")
    if tok is None:
        kind = DEFAULT_TOKENIZER[dataset] if tokenizer == "auto" else tokenizer
        if kind == "word":
            tok = WordVocab.build(lines["train"])
            if tok.unk not in tok.stoi:  # WikiText's train split has <unk>; other text gets it here
                tok = WordVocab(tok.itos + [tok.unk])
        elif kind == "char":
            tok = CharVocab.build(line for split in lines.values() for line in split)
        else:
            tok = load_or_train_bpe(lines["train"], bpe_vocab_size, Path(cache_dir) / "tokenizers",
                                    name_or_path=None if kind == "bpe" else kind)
    return tok, {split: (encode_checked(tok, lines[split], f"the {split} split"), None) for split in splits}


def encode_checked(tok, lines, what: str):
    """``tok.encode(lines)``; a unit the vocabulary lacks (and cannot read as unknown) is a ValueError naming ``what``."""
    try:
        return tok.encode(lines)
    except KeyError as e:
        raise ValueError(f"{what}: {e.args[0]}") from None


def checkpoint_extra(tok, dataset: str, data_dir: Optional[str], synthetic_tokens: int) -> dict:
    """What eval / generate need besides the weights: the data spec (``data_dir`` made absolute, so that the run
    works from any folder) and the tokenizer itself."""
    data_dir = None if data_dir is None else str(Path(data_dir).resolve())
    return {"data": {"dataset": dataset, "data_dir": data_dir, "synthetic_tokens": synthetic_tokens},
            "tokenizer": tokenizer_state(tok)}


def make_loader(stream, node_fields, cfg, train: bool) -> SequenceLoader:
    """Loader over a token stream sized by a :class:`~tmt_pyg.train.TrainConfig` (``seq_len``,
    ``batch_size``, ``seed``, ``rank``, ``world_size``): shuffled, full batches only for training;
    in order, every token for evaluation."""
    return SequenceLoader(stream, cfg.seq_len, cfg.batch_size, shuffle=train, seed=cfg.seed, drop_last=train,
                          rank=cfg.rank, world_size=cfg.world_size, node_fields=node_fields)
