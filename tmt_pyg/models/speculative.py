"""Self-speculative decoding: the first layers plus the shared head draft tokens, the full model
verifies them in one extension of the cache, and the rows keep what the full model would have
produced (LayerSkip's use of early exits; greedy output is that of plain greedy decoding)."""
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..data.batching import TokenInput
from .generation import Decoder, TMTCache, check_generate_args, extend, filtered_probs, generate


@dataclass
class SpeculativeStats:
    rounds: int = 0  # draft-and-verify rounds
    drafted: int = 0  # draft tokens proposed, summed over rows
    accepted: int = 0  # draft tokens the full model kept

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


def choose(probs: Optional[Tensor], logits: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One id per row (B, V) -> (B,): the argmax (``probs`` None: greedy) or a sample of ``probs``."""
    return logits.argmax(-1) if probs is None else torch.multinomial(probs, 1, generator=generator).view(-1)


@torch.no_grad()
def speculative_generate(model: Decoder, idx: TokenInput, max_new_tokens: int, draft_layers: int, draft_tokens: int = 4,
                         temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                         generator: Optional[torch.Generator] = None,
                         compiled: bool = False) -> Tuple[Union[Tensor, List[Tensor]], SpeculativeStats]:
    """:meth:`TMTModel.generate` with ``draft_tokens`` tokens per round drafted by the first
    ``draft_layers`` layers and verified by the full model in one cache extension.

    Greedy (``temperature == 0``): every row gets exactly the tokens of plain greedy decoding.
    Sampling: a draft token ``x`` is kept with probability ``min(1, p(x) / q(x))`` (``p`` the full
    model's filtered distribution, ``q`` the draft's); at the first rejection the row's next token
    is drawn from ``max(0, p - q)`` renormalised, so every token follows the full model's
    distribution. Rows advance at their own rate. ``compiled``: drafts and verifications as compiled
    steps (:func:`~tmt_pyg.models.generation.compiled_extend`). Returns the sequences and the round
    statistics.
    """
    L = model.config.n_layers
    if not isinstance(draft_layers, int) or not 1 <= draft_layers < L:
        raise ValueError(f"draft_layers must be an integer in [1, {L - 1}] (the model has {L} layers), got {draft_layers!r}")
    if not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    prompts, ragged, longest = check_generate_args(model, idx, max_new_tokens)
    greedy = temperature == 0
    stats = SpeculativeStats()
    was_training = model.training
    model.eval()
    try:
        # a row stops advancing once it has its tokens (its last positions are rewritten each round), so no row
        # grows past its prompt + max_new_tokens - 1 before a round of 1 + draft_tokens
        cache = TMTCache(model, prompts, capacity=min(longest + max_new_tokens + draft_tokens, model.config.max_seq_len))
        B = len(cache.host_lengths)
        rows = torch.arange(B)
        new: List[List[Tensor]] = [[] for _ in range(B)]
        produced = torch.zeros(B, dtype=torch.long)
        pending = None  # (B,) a row's next token when the last round ended on a rejection (sampling)
        while int(produced.min()) < max_new_tokens:
            probs = None if greedy else filtered_probs(cache.last_logits, temperature, top_k, top_p)
            first = choose(probs, cache.last_logits, generator) if pending is None else pending  # (B,)
            room = min(draft_tokens, model.config.max_seq_len - max(cache.host_lengths) - 1, cache.capacity - max(cache.host_lengths) - 1)
            start = cache.lengths
            drafts, draft_probs, token = [], [], first
            for _ in range(max(room, 0)):  # the first layers propose, each token from the one before
                logits = extend(model, cache, token.unsqueeze(1), num_layers=draft_layers, compiled=compiled)[:, -1]
                q = None if greedy else filtered_probs(logits, temperature, top_k, top_p)
                token = choose(q, logits, generator)
                drafts.append(token)
                draft_probs.append(q)
            cache.lengths = start
            seq = torch.stack([first] + drafts, 1)  # (B, 1 + d)
            full = extend(model, cache, seq, compiled=compiled)  # (B, 1 + d, V): full[:, i] predicts the token after seq[:, i]
            d = len(drafts)
            if greedy:
                keep = full[:, :d].argmax(-1) == seq[:, 1:]  # (B, d)
            else:
                p = filtered_probs(full, temperature, top_k, top_p)  # (B, 1 + d, V)
                q = torch.stack(draft_probs, 1) if d else p[:, :0]
                p_x, q_x = (t[:, :d].gather(-1, seq[:, 1:].unsqueeze(-1)).squeeze(-1) for t in (p, q))
                keep = torch.rand(B, d, generator=generator) * q_x < p_x  # u < p / q
            accepted = keep.long().cumprod(1).sum(1)  # (B,) leading kept drafts
            running = produced < max_new_tokens
            stats.rounds += 1
            stats.drafted += int(running.sum()) * d
            stats.accepted += int(accepted[running].sum())
            for b in running.nonzero().view(-1).tolist():
                new[b].append(seq[b, :int(accepted[b]) + 1])
            produced += torch.where(running, accepted + 1, 0)
            cache.lengths = start + torch.where(produced < max_new_tokens, accepted + 1, 0)  # finished rows stay put
            cache.last_logits = full[rows, accepted]
            pending = None
            if not greedy and bool((accepted < d).any()):  # rejected rows draw from max(0, p - q)
                at = accepted.clamp(max=max(d - 1, 0))
                residual = (p[rows, at] - q[rows, at]).clamp(min=0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, at])
                fix = torch.multinomial(residual, 1, generator=generator).view(-1)
                pending = torch.where(accepted < d, fix, choose(p[rows, accepted], full[rows, accepted], generator))
        out = [torch.cat(n)[:max_new_tokens] for n in new]
        if ragged:
            return [torch.cat([p, t]) for p, t in zip(prompts, out)], stats
        return torch.cat([idx, torch.stack(out)], 1), stats
    finally:
        model.train(was_training)


def held_out_prompts(stream: Tensor, batch_size: int, prompt_tokens: int, seed: int = 0) -> Tensor:
    """``batch_size`` prompts (B, prompt_tokens) cut from random places of a token ``stream`` (n,)."""
    if stream.numel() <= prompt_tokens:
        raise ValueError(f"a stream of {stream.numel()} tokens holds no prompt of {prompt_tokens} tokens")
    starts = torch.randint(0, stream.numel() - prompt_tokens, (batch_size,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + prompt_tokens] for s in starts.tolist()])


@torch.no_grad()
def choose_drafting(model: Decoder, prompts: Tensor, max_new_tokens: int, draft_tokens: Sequence[int] = (2, 4),
                    repeats: int = 3) -> Dict:
    """Pick the self-speculative drafting of ``model`` on this machine: greedy decoding of ``prompts``
    (B, P) timed plainly and with every ``draft_layers`` E in [1, L) and every d in ``draft_tokens``,
    all variants called in turn ``repeats`` times (median). Returns ``{"draft_layers", "draft_tokens"}``
    of the fastest variant (both None when plain decoding is fastest), its ``speedup`` over plain, plain
    decoding's ``tokens_per_s`` and ``variants``: per ``"E,d"`` the acceptance rate and new tokens/s."""
    if prompts.dim() != 2:
        raise ValueError(f"prompts must be a (B, P) tensor, got shape {tuple(prompts.shape)}")
    drafts = [(E, d) for E in range(1, model.config.n_layers) for d in draft_tokens]
    acceptance = {f"{E},{d}": speculative_generate(model, prompts, max_new_tokens, E, d, temperature=0)[1].acceptance
                  for E, d in drafts}
    seconds: Dict[str, List[float]] = {"plain": [], **{key: [] for key in acceptance}}
    for _ in range(repeats):
        for key in seconds:
            draft = () if key == "plain" else tuple(map(int, key.split(",")))
            start = time.perf_counter()
            if draft:
                speculative_generate(model, prompts, max_new_tokens, *draft, temperature=0)
            else:
                generate(model, prompts, max_new_tokens, temperature=0)
            seconds[key].append(time.perf_counter() - start)
    rate = {key: prompts.size(0) * max_new_tokens / statistics.median(t) for key, t in seconds.items()}
    best = max(rate, key=rate.get)
    E, d = (None, None) if best == "plain" else map(int, best.split(","))
    return {"draft_layers": E, "draft_tokens": d, "speedup": rate[best] / rate["plain"], "batch_size": prompts.size(0),
            "new_tokens": max_new_tokens, "tokens_per_s": rate["plain"],
            "variants": {key: {"acceptance": acceptance[key], "tokens_per_s": rate[key]} for key in acceptance}}
