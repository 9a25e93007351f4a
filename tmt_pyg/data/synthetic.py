"""Embedded default corpus: Markov text with associative-recall episodes, generated from a seed.

The stream is a sequence of blocks of ``block_len`` tokens. Each block holds one episode inserted into
a bigram Markov chain over words ``w*``::

    k3 v9 k7 v2 k0 v5 k12 v1 | w.. (gap) | <q> k7 v2 <q> k0 v5 | w.. (rest of the block)

The value after ``<q> key`` is the one bound to ``key`` earlier in the block: predicting it needs
content-based retrieval of the earlier key (what the kNN mesh offers), not n-gram statistics.
Loader windows whose length is a multiple of ``block_len`` never cut an episode.
"""
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticCorpus:
    tokens: Tensor  # (T,) long token stream
    answer_mask: Tensor  # (T,) bool, True where the token is a recalled value (scored from position t-1)
    vocab_size: int
    itos: list[str]  # id -> "<q>", "w17", "k3", "v9"

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return " ".join(self.itos[i] for i in ids)


def markov_chain(successors: Tensor, cdf: Tensor, start: Tensor, length: int, gen: torch.Generator) -> Tensor:
    """Sample ``len(start)`` bigram chains of ``length`` words in parallel: (n,) -> (n, length)."""
    u = torch.rand(length, start.numel(), 1, generator=gen)
    out, word = torch.empty(start.numel(), length, dtype=torch.long), start
    for t in range(length):
        choice = torch.searchsorted(cdf[word], u[t]).squeeze(1).clamp_(max=cdf.size(1) - 1)
        word = out[:, t] = successors[word, choice]
    return out


def associative_recall_corpus(n_tokens: int, seed: int = 0, *, n_words: int = 128, n_keys: int = 32,
                              n_values: int = 32, n_pairs: int = 4, n_queries: int = 2, gap: tuple[int, int] = (8, 64),
                              block_len: int = 128, branching: int = 4, language_seed: int = 0) -> SyntheticCorpus:
    """Generate ``n_tokens`` tokens of Markov text with associative-recall episodes.

    Args:
        n_tokens: stream length.
        seed: sampling seed; use different seeds for train and validation streams.
        n_words / n_keys / n_values: sizes of the disjoint word, key and value id ranges.
        n_pairs: key-value pairs per episode (distinct keys); n_queries of them are queried.
        gap: (min, max) number of filler words between the pairs and the queries.
        block_len: tokens per block (one episode each).
        branching: successors per word in the sparse bigram table.
        language_seed: seed of the bigram table, shared by train and validation streams.
    """
    L, P, Q = block_len, n_pairs, n_queries
    assert n_tokens >= 1, f"n_tokens must be positive, got {n_tokens}"
    assert 1 <= Q <= P <= n_keys, f"need 1 <= n_queries ({Q}) <= n_pairs ({P}) <= n_keys ({n_keys})"
    assert 0 <= gap[0] <= gap[1] and 2 * P + gap[1] + 3 * Q <= L, \
        f"an episode of up to {2 * P + gap[1] + 3 * Q} tokens does not fit a block of {L}"
    assert 1 <= branching <= n_words, f"branching ({branching}) must be in [1, n_words={n_words}]"
    Q_ID, W0, K0, V0 = 0, 1, 1 + n_words, 1 + n_words + n_keys
    itos = ["<q>"] + [f"w{i}" for i in range(n_words)] + [f"k{i}" for i in range(n_keys)] + [f"v{i}" for i in range(n_values)]

    lang = torch.Generator().manual_seed(language_seed)
    successors = torch.rand(n_words, n_words, generator=lang).argsort(1)[:, :branching]  # (W, branching)
    probs = -torch.rand(n_words, branching, generator=lang).log()  # Dirichlet(1) rows after normalising
    cdf = (probs / probs.sum(1, keepdim=True)).cumsum(1)

    gen = torch.Generator().manual_seed(seed)
    n_blocks = -(-n_tokens // L)
    n_fill = L - 2 * P - 3 * Q
    start = torch.randint(n_words, (n_blocks,), generator=gen)
    filler = W0 + markov_chain(successors, cdf, start, n_fill, gen)  # (n_blocks, n_fill)
    keys = torch.rand(n_blocks, n_keys, generator=gen).argsort(1)[:, :P]  # distinct keys per episode
    values = torch.randint(n_values, (n_blocks, P), generator=gen)
    asked = torch.rand(n_blocks, P, generator=gen).argsort(1)[:, :Q]  # distinct pairs queried
    pairs = torch.stack([K0 + keys, V0 + values], -1).reshape(n_blocks, 2 * P)
    queries = torch.stack([torch.full((n_blocks, Q), Q_ID), K0 + keys.gather(1, asked),
                           V0 + values.gather(1, asked)], -1).reshape(n_blocks, 3 * Q)
    g = torch.randint(gap[0], gap[1] + 1, (n_blocks, 1), generator=gen)

    # Block layout by position p: pairs [0, 2P), filler [2P, 2P+g), queries [2P+g, 2P+g+3Q), filler after.
    p = torch.arange(L).expand(n_blocks, L)
    q_at = p - 2 * P - g  # offset inside the queries segment
    in_query = (q_at >= 0) & (q_at < 3 * Q)
    fill_at = torch.where(q_at < 0, p - 2 * P, p - 2 * P - 3 * Q).clamp(0, n_fill - 1)
    blocks = torch.where(in_query, queries.gather(1, q_at.clamp(0, 3 * Q - 1)), filler.gather(1, fill_at))
    blocks = torch.where(p < 2 * P, pairs.gather(1, p.clamp(max=2 * P - 1)), blocks)
    answer = in_query & (q_at % 3 == 2)
    return SyntheticCorpus(blocks.reshape(-1)[:n_tokens].clone(), answer.reshape(-1)[:n_tokens].clone(),
                           len(itos), itos)
