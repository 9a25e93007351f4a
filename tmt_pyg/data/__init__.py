from .batching import batch_to_padded, tokens_to_batch
from .graphs import dataset_root
from .loader import SequenceLoader, variable_length_batches
from .synthetic import SyntheticCorpus, associative_recall_corpus
from .text import CharVocab, WordVocab, load_text_splits
from .tokenizer import HFTokenizer, load_or_train_bpe

__all__ = [
    "tokens_to_batch", "batch_to_padded", "dataset_root",
    "SequenceLoader", "variable_length_batches",
    "SyntheticCorpus", "associative_recall_corpus",
    "load_text_splits", "WordVocab", "CharVocab",
    "load_or_train_bpe", "HFTokenizer",
]
