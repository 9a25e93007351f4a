import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from tmt_pyg import TMTConfig, tokens_to_batch
from tmt_pyg.cli import main
from tmt_pyg.data import CharVocab, WordVocab
from tmt_pyg.hf import TMTForCausalLM, TMTHFConfig, vocab_tokenizer
from tmt_pyg.train import load_run
from test_cli import TINY_TRAIN
from test_model import CONFIGS, SMALL, make_model


def hf_model(**overrides) -> TMTForCausalLM:
    """The HF wrapper around the same weights as ``make_model`` (gates spread so exits fire)."""
    model = TMTForCausalLM(TMTHFConfig.from_tmt_config(TMTConfig(**{**SMALL, **overrides})))
    model.tmt.load_state_dict(make_model(**overrides).state_dict())
    return model.eval()


def left_pad(rows, pad_id=0):
    S = max(r.numel() for r in rows)
    ids = torch.full((len(rows), S), pad_id)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - r.numel():], mask[i, S - r.numel():] = r, 1
    return ids, mask


def test_config_conversion(tmp_path):
    cfg = TMTConfig(**SMALL, use_anchors=False, mesh_backend="dense", gate_loss="decisiveness")
    hf_cfg = TMTHFConfig.from_tmt_config(cfg)
    assert hf_cfg.to_tmt_config() == cfg
    assert (hf_cfg.hidden_size, hf_cfg.num_attention_heads, hf_cfg.num_hidden_layers) == (32, 4, 3)
    assert hf_cfg.model_type == "tmt" and hf_cfg.tie_word_embeddings
    hf_cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TMTHFConfig) and loaded.to_tmt_config() == cfg
    assert TMTHFConfig().to_tmt_config() == TMTConfig()
    with pytest.raises(ValueError, match="graph_k"):
        TMTHFConfig(graph_k=-1)
    with pytest.raises(ValueError, match="tie"):
        TMTHFConfig(tie_word_embeddings=False)


def test_save_load_round_trip(tmp_path):
    model = hf_model()
    with torch.no_grad():  # make the buffer differ from any fresh initialisation
        model.tmt.anchors.anchor_state.add_(torch.randn_like(model.tmt.anchors.anchor_state))
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, TMTForCausalLM) and not loaded.training
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(loaded.tmt.anchors.anchor_state, model.tmt.anchors.anchor_state)
    ids = torch.randint(0, 50, (2, 20))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.get_input_embeddings() is loaded.tmt.wte  # the LM head reads the same matrix


@pytest.mark.parametrize("gate_loss", ["none", "consistency"])
def test_loss_equals_tmt_loss(gate_loss):
    """Training: TMTModel's weighted loss (LM, early-exit, gate); evaluation: the LM loss alone."""
    model = hf_model(gate_loss=gate_loss, exit_threshold=0.6, exit_loss_weight=0.5)
    ids = torch.randint(0, 50, (2, 16))
    ref = model.tmt(ids, compute_loss=True)
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.lm_loss)
    model.train()
    torch.manual_seed(0)  # the consistency objective scores a random subset of tokens
    ref = model.tmt(ids, compute_loss=True)
    torch.manual_seed(0)
    out = model(ids, labels=ids)
    assert ref.exit_loss.item() > 0 and (gate_loss == "none") == (ref.gate_loss.item() == 0)
    torch.testing.assert_close(out.loss, ref.loss)


def test_padding_and_ignored_labels():
    model = hf_model(gate_loss="none")
    rows = [torch.randint(0, 50, (n,)) for n in (9, 4, 13)]
    ids, mask = left_pad(rows)
    out = model(ids, attention_mask=mask, labels=ids)
    ref = model.tmt(tokens_to_batch(rows), compute_loss=True)
    torch.testing.assert_close(out.logits[mask.bool()], ref.logits, atol=1e-5, rtol=1e-5)
    assert bool((out.logits[~mask.bool()] == 0).all())
    torch.testing.assert_close(out.loss, ref.lm_loss, atol=1e-5, rtol=1e-5)
    labels = ids.clone()
    labels[:, -1] = -100  # the last target of every row is not scored
    rows_short = [r[:-1] for r in rows]
    ref_short = model.tmt(tokens_to_batch(rows_short), compute_loss=True).lm_loss
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels).loss, ref_short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["exits-firing", "vanilla"])
def test_generate_equals_own_greedy(name, use_cache):
    model = hf_model(**CONFIGS[name])
    ids = torch.randint(0, 50, (2, 7))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=use_cache)
    assert torch.equal(out, model.tmt.generate(ids, 6, temperature=0))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["exits-firing", "attention-mesh"])
def test_generate_step_logits_equal_full_forward(name, use_cache):
    """Every decoding step's logits, cached or recomputed, are those of a full forward over the prefix
    (a step that lost its context would score the new token alone)."""
    model = hf_model(**CONFIGS[name])
    ids = torch.randint(0, 50, (2, 7))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=use_cache, output_logits=True,
                         return_dict_in_generate=True)
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step, model(out.sequences[:, :ids.size(1) + t]).logits[:, -1], atol=1e-4, rtol=1e-4)


def test_cache_under_either_name():
    """A step fed its cache as ``cache`` or as transformers 4's ``past_key_values`` continues the prefix."""
    model = hf_model(**CONFIGS["exits-firing"])
    ids = torch.randint(0, 50, (2, 9))
    full = model(ids).logits[:, -1]
    for name in ("cache", "past_key_values"):
        prefix = model(ids[:, :-1], use_cache=True)
        cache = prefix["cache"] if "cache" in prefix else prefix["past_key_values"]
        torch.testing.assert_close(model(ids[:, -1:], **{name: cache}).logits[:, -1], full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, -1:], cache=cache, past_key_values=cache)


def test_generate_left_padded():
    model = hf_model(**CONFIGS["exits-firing"])
    rows = [torch.randint(1, 50, (n,)) for n in (8, 3)]
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        assert torch.equal(out[i, ids.size(1):], model.tmt.generate(row.unsqueeze(0), 5, temperature=0)[0, row.numel():])


@pytest.mark.parametrize("name", ["exits-firing", "attention-mesh"])
def test_beam_search_cache_equals_recompute(name):
    model = hf_model(**CONFIGS[name])
    ids = torch.randint(0, 50, (2, 6))
    runs = [model.generate(ids, max_new_tokens=16, num_beams=3, do_sample=False, use_cache=use_cache,
                           output_scores=True, return_dict_in_generate=True) for use_cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(runs[0].sequences_scores, runs[1].sequences_scores, atol=1e-4, rtol=1e-4)


def test_clear_errors():
    model = hf_model()
    ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(ValueError, match="eval"):
        model.train()(ids, use_cache=True)
    model.eval()
    with pytest.raises(TypeError, match="TMTGenerationCache"):
        model(ids, cache=DynamicCache())
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))


def test_export_a_cli_run(tmp_path, capsys):
    run, folder = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--steps", "2", "--out", str(run), *TINY_TRAIN, "--eval-batches", "1"]) == 0
    assert main(["export", str(run), str(folder)]) == 0
    assert f"TMTForCausalLM.from_pretrained('{folder}')" in capsys.readouterr().out
    model, tok, _ = load_run(run)
    loaded = TMTForCausalLM.from_pretrained(folder)
    assert loaded.config.to_tmt_config() == model.config
    text = "k3 v9 k7 v2 w5 <q> k7"
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tok.encode([text]).tolist()[:-1]  # the run's ids, without the line's closing eos
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", ["char", "word"])
def test_vocab_tokenizer_gives_the_same_ids(kind):
    lines = ["Hello, wörld!  two  spaces", "\ttab and <unk>"]
    vocab = CharVocab.build(lines) if kind == "char" else WordVocab.build(lines)
    hf = vocab_tokenizer(vocab)
    text = "\n".join(lines) + "\n" if kind == "char" else " <eos> ".join(lines) + " <eos>"
    ids = vocab.encode(lines).tolist()
    assert hf(text)["input_ids"] == ids and hf.decode(ids) == vocab.decode(ids)
    if kind == "word":  # a word the vocabulary lacks reads as <unk>
        assert hf("Hello, moon")["input_ids"] == [vocab.stoi["Hello,"], vocab.stoi["<unk>"]]
