"""HuggingFace ``transformers`` wrappers: ``TMTHFConfig`` and ``TMTForCausalLM`` (``save_pretrained``,
``from_pretrained``, ``generate``) around :class:`TMTModel`, with our per-layer cache as the model's ``cache``
(``past_key_values`` before transformers 5)."""
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .data.batching import tokens_to_batch
from .models import TMTConfig, TMTModel
from .models.generation import TMTCache, extend

TMT_FIELDS = tuple(f.name for f in fields(TMTConfig))
# the output field that hands the cache back to ``generate``: ``cache`` since transformers 5, ``past_key_values`` before
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class TMTHFConfig(PretrainedConfig):
    """``transformers`` config holding every :class:`TMTConfig` field under its own name (validated by
    ``TMTConfig``); ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers`` and
    ``max_position_embeddings`` are aliases of ``d_model``, ``n_heads``, ``n_layers``, ``max_seq_len``."""

    model_type = "tmt"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
                     "max_position_embeddings": "max_seq_len"}

    def __init__(self, **kwargs):
        tmt = TMTConfig(**{name: kwargs.pop(name) for name in TMT_FIELDS if name in kwargs})
        for name in TMT_FIELDS:
            setattr(self, name, getattr(tmt, name))
        if not kwargs.setdefault("tie_word_embeddings", True):
            raise ValueError("TMT always ties the LM head to the token embedding (tie_word_embeddings=True)")
        super().__init__(**kwargs)

    @classmethod
    def from_tmt_config(cls, config: TMTConfig, **kwargs) -> "TMTHFConfig":
        return cls(**asdict(config), **kwargs)

    def to_tmt_config(self) -> TMTConfig:
        return TMTConfig(**{name: getattr(self, name) for name in TMT_FIELDS})


class TMTGenerationCache:
    """The ``cache`` of :class:`TMTForCausalLM`: one batched :class:`TMTCache` (rows may hold
    different numbers of real tokens). ``transformers`` hands it back at every decoding step."""

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: TMTCache, seq_length: int):
        self.cache, self.seq_length = cache, seq_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of ``input_ids`` seen so far, padding included."""
        return self.seq_length

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row ``i`` continues from the cache of row ``beam_idx[i]`` (rows copied, since
        decoding writes into the cache)."""
        cache = self.cache
        for layer in cache.layers:
            layer.state, layer.key, layer.value = layer.state[beam_idx], layer.key[beam_idx], layer.value[beam_idx]
            if layer.unit is not None:  # what the mesh search compares: the beam's own rows too
                layer.unit = layer.unit[beam_idx]
        cache.lengths, cache.last_logits = cache.lengths[beam_idx], cache.last_logits[beam_idx]


class TMTForCausalLM(PreTrainedModel, GenerationMixin):
    """:class:`TMTModel` as a ``transformers`` causal LM (LM head tied to the embedding).

    ``forward`` takes padded ``input_ids`` (B, S) with an optional ``attention_mask``: positions with
    mask 0 are dropped and the remaining tokens of each row form one ragged PyG batch (no padding
    reaches the model), so left padding works; logits at dropped positions are 0.
    """

    config_class = TMTHFConfig
    base_model_prefix = "tmt"
    main_input_name = "input_ids"

    def __init__(self, config: TMTHFConfig):
        super().__init__(config)
        self.tmt = TMTModel(config.to_tmt_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to do: TMTModel initialises itself (scaled residual init, anchors) and
        ``from_pretrained`` loads every tensor, the ``anchor_state`` buffer included."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds a TMTGenerationCache itself; a DynamicCache cannot hold a mesh

    def generate(self, *args, assistant_early_exit: Optional[int] = None, **kwargs):
        """transformers' ``generate``; ``assistant_early_exit`` is refused with our own entry point."""
        if assistant_early_exit is not None:
            raise ValueError(
                "assistant_early_exit is not supported by TMTForCausalLM: transformers drafts by lowering "
                "config.num_hidden_layers and cropping its own cache, and TMT's per-layer mesh caches are neither; use "
                f"model.tmt.generate(input_ids, max_new_tokens, temperature=0, draft_layers={assistant_early_exit}) "
                "(self-speculative decoding: the same greedy output)")
        return super().generate(*args, **kwargs)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.tmt.wte

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.tmt.wte = value

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                cache: Optional[TMTGenerationCache] = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, past_key_values: Optional[TMTGenerationCache] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """``input_ids`` (B, S) (only the new tokens when ``cache`` is given; ``past_key_values`` is its
        transformers-4 name), ``attention_mask``
        (B, S) or (B, past + S), ``labels`` (B, S) scored HF-style (shifted inside, -100 ignored).
        ``loss``: the next-token cross-entropy; in training mode plus the weighted early-exit loss and
        gate objective of ``TMTModel``'s loss (evaluation computes neither). Returns ``logits`` (B, S, V), or its last ``logits_to_keep`` columns."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.size(0) != input_ids.size(0)
                                           or attention_mask.size(1) < input_ids.size(1)):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not cover input_ids "
                             f"of shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        keep = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask[:, -input_ids.size(1):].bool())
        rows = [ids[k] for ids, k in zip(input_ids, keep)]
        if any(row.numel() == 0 for row in rows):
            raise ValueError("every row needs at least one token with attention_mask 1")
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass the cache as cache or as past_key_values, not both")
            cache = past_key_values
        cached = cache is not None or bool(use_cache)
        if cached and (self.training or labels is not None):
            raise ValueError("the TMT cache serves inference only: call model.eval(), pass no labels, or use_cache=False")
        loss = None
        if cache is not None:
            if not isinstance(cache, TMTGenerationCache):
                raise TypeError(f"cache must be a TMTGenerationCache made by this model, got {type(cache).__name__}")
            if not bool(keep.all()):
                raise ValueError("with a cache every new token must have attention_mask 1")
            flat = extend(self.tmt, cache.cache, input_ids).flatten(0, 1)  # all rows decoded together
            cache.seq_length += input_ids.size(1)
        elif cached and logits_to_keep == 1:  # generate()'s prefill: the cache's last logits are all it needs
            cache = TMTGenerationCache(TMTCache(self.tmt, rows), input_ids.size(1))
            flat = cache.cache.last_logits
            keep = torch.ones_like(keep[:, -1:])
        else:
            data = tokens_to_batch(rows)
            train_losses = labels is not None and self.training
            out = self.tmt(data, compute_loss=train_losses)
            flat = out.logits  # (N, V), rows concatenated
            if cached:
                cache = TMTGenerationCache(TMTCache(self.tmt, rows), input_ids.size(1))
            if labels is not None:
                target = labels[keep]  # (N,) in the order of flat
                same = data.batch[1:] == data.batch[:-1]  # positions t and t+1 in the same row
                loss = F.cross_entropy(flat[:-1][same], target[1:][same], ignore_index=-100)
                if train_losses:  # the training-only terms of TMTModel's loss, as weighted there
                    loss = loss + out.loss - out.lm_loss
        logits = flat.new_zeros(*keep.shape, flat.size(-1))
        logits[keep] = flat
        return CausalLMOutputWithPast(loss=loss, logits=logits[:, -logits_to_keep:],
                                      **{CACHE_FIELD: cache if cached else None})


def vocab_tokenizer(vocab):
    """A :class:`~tmt_pyg.data.WordVocab` / ``CharVocab`` as a ``transformers`` fast tokenizer: the same ids for
    the same words / characters (it appends no end-of-line token; the vocabulary's ``eos`` is a unit like any)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk = vocab.unk if vocab.unk in vocab.stoi else None
    backend = Tokenizer(models.WordLevel(vocab.stoi, unk_token=unk))
    if vocab.sep == "":  # characters, newlines included, joined as they are
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
    else:  # whitespace-separated words, joined by one space
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk)


def export_run(run, out_dir) -> list:
    """Write a trained run (folder: its newest checkpoint; or a checkpoint file) as a ``transformers`` folder:
    :class:`TMTForCausalLM` by ``save_pretrained`` (calibrated tau included) and the run's tokenizer (a BPE as
    it is, a word / char vocabulary through :func:`vocab_tokenizer`). Returns the names of the files written."""
    from .data.tokenizer import HFTokenizer
    from .train import load_run

    model, tok, _ = load_run(run)
    hf_model = TMTForCausalLM(TMTHFConfig.from_tmt_config(model.config))
    hf_model.tmt.load_state_dict(model.state_dict())
    hf_model.save_pretrained(out_dir)
    (tok.tokenizer if isinstance(tok, HFTokenizer) else vocab_tokenizer(tok)).save_pretrained(out_dir)
    return sorted(path.name for path in Path(out_dir).iterdir())


# `AutoConfig` / `AutoModelForCausalLM.from_pretrained(path)` work once this module is imported
AutoConfig.register("tmt", TMTHFConfig, exist_ok=True)
AutoModelForCausalLM.register(TMTHFConfig, TMTForCausalLM, exist_ok=True)
