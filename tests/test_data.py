import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from tmt_pyg.data import (CharVocab, SequenceLoader, WordVocab, associative_recall_corpus, dataset_root,
                          load_or_train_bpe, load_text_splits, variable_length_batches)
from tmt_pyg.data import tokenizer as tokenizer_module
from tmt_pyg.data.corpus import load_data

DATA = Path(os.environ.get("TMT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
WIKI, SHAKES = DATA / "wikitext-2", DATA / "tinyshakespeare"
needs_wiki = pytest.mark.skipif(not (WIKI / "train.txt").is_file(),
                                reason=f"WikiText-2 not found in {WIKI} (set TMT_DATA_DIR to the corpora folder)")
needs_shakes = pytest.mark.skipif(not (SHAKES / "train.txt").is_file(),
                                  reason=f"Tiny Shakespeare not found in {SHAKES} (set TMT_DATA_DIR to the corpora folder)")


def read_lines(path: Path) -> list[str]:
    """Reference reader in plain Python: the file's lines without their newline."""
    text = path.read_text(encoding="utf-8")
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


@pytest.fixture(scope="module")
def wiki_slice(tmp_path_factory):
    """First 2000 lines of WikiText-2 valid as a train split, the next 1000 as a validation split."""
    lines = read_lines(WIKI / "valid.txt")
    root = tmp_path_factory.mktemp("wiki")
    (root / "train.txt").write_text("\n".join(lines[:2000]) + "\n", encoding="utf-8")
    (root / "valid.txt").write_text("\n".join(lines[2000:3000]) + "\n", encoding="utf-8")
    return root, lines[:2000], lines[2000:3000]


@needs_wiki
def test_load_local_splits(wiki_slice, tmp_path):
    root, train, valid = wiki_slice
    splits = load_text_splits("wikitext-2", str(root), cache_dir=str(tmp_path))
    assert set(splits) == {"train", "validation"}
    assert splits["train"] == train and splits["validation"] == valid


@needs_shakes
def test_load_by_name_under_root_and_char_vocab(tmp_path):
    splits = load_text_splits("tinyshakespeare", str(DATA), cache_dir=str(tmp_path))
    assert set(splits) == {"train", "validation"}  # no test split in this corpus
    text = (SHAKES / "train.txt").read_text(encoding="utf-8")
    vocab = CharVocab.build(splits["train"])
    assert len(vocab) == 65
    ids = vocab.encode(splits["train"])
    assert ids.numel() == len(text) + (not text.endswith("\n"))  # "\n" closes the last line too
    assert vocab.decode(ids) == text + ("" if text.endswith("\n") else "\n")


@needs_wiki
def test_word_vocab_counts(wiki_slice):
    _, train, _ = wiki_slice
    counts = Counter(w for line in train for w in line.split())
    counts["<eos>"] = len(train)
    vocab = WordVocab.build(train)
    ids = vocab.encode(train)
    assert len(vocab) == len(counts) and ids.numel() == sum(counts.values())
    freq = torch.bincount(ids, minlength=len(vocab)).tolist()
    assert all(freq[vocab.stoi[w]] == c for w, c in counts.items())


@needs_wiki
def test_word_vocab_roundtrip_unk_save_load(wiki_slice, tmp_path):
    _, train, valid = wiki_slice
    vocab = WordVocab.build(train)
    assert vocab.decode(vocab.encode(train)).split() == [w for line in train for w in line.split() + ["<eos>"]]
    known = [w if w in vocab.stoi else "<unk>" for line in valid for w in line.split() + ["<eos>"]]
    assert known.count("<unk>") > 0  # the slice has words unseen in the train slice
    assert vocab.decode(vocab.encode(valid)).split() == known
    vocab.save(tmp_path / "vocab.json")
    loaded = WordVocab.load(tmp_path / "vocab.json")
    assert loaded.itos == vocab.itos and torch.equal(loaded.encode(valid), vocab.encode(valid))
    with pytest.raises(ValueError, match="not a CharVocab"):
        CharVocab.load(tmp_path / "vocab.json")


def test_vocab_without_unk_raises():
    vocab = WordVocab.build(["the cat sat", "on the mat"])
    assert vocab.decode(vocab.encode(["the mat"])) == "the mat <eos>"
    with pytest.raises(KeyError, match="'dog' is not in the vocabulary and the vocabulary has no unknown token"):
        vocab.encode(["the dog"])


@needs_wiki
def test_full_wikitext2_counts(tmp_path):
    """The README's numbers: 2,088,628 train tokens (one <eos> per line) and a vocabulary of 33,278."""
    splits = load_text_splits("wikitext-2", str(DATA), cache_dir=str(tmp_path))
    vocab = WordVocab.build(splits["train"])
    assert len(vocab) == 33_278
    assert vocab.encode(splits["train"]).numel() == 2_088_628
    assert vocab.encode(splits["validation"]).numel() == 217_646
    assert vocab.encode(splits["test"]).numel() == 245_569


@needs_wiki
def test_bpe_train_cache_and_load(wiki_slice, tmp_path, monkeypatch):
    _, train, valid = wiki_slice
    lines = train[:400]
    tok = load_or_train_bpe(lines, 300, tmp_path)
    assert len(tok) == 300
    ids = tok.encode(valid[:50])
    assert ids.dtype == torch.long and int(ids.max()) < 300
    assert tok.decode(ids) == "".join(line + "\n" for line in valid[:50])  # byte-level: lossless
    (saved,) = tmp_path.glob("bpe-300-*")

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    assert torch.equal(load_or_train_bpe(lines, 300, tmp_path).encode(valid[:50]), ids)
    assert torch.equal(load_or_train_bpe([], 0, tmp_path, name_or_path=str(saved)).encode(valid[:50]), ids)
    with pytest.raises(AssertionError, match="reused"):  # other lines -> another cache entry
        load_or_train_bpe(lines[:10], 300, tmp_path)


def test_bpe_vocab_size_too_small(tmp_path):
    with pytest.raises(ValueError, match="must exceed 257"):
        load_or_train_bpe(["a b c"], 100, tmp_path)


def test_synthetic_determinism():
    a, b = associative_recall_corpus(5000, seed=1), associative_recall_corpus(5000, seed=1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answer_mask, b.answer_mask)
    c = associative_recall_corpus(5000, seed=2)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == a.answer_mask.shape == (5000,) and a.answer_mask.dtype == torch.bool
    assert a.vocab_size == len(a.itos) and 0 <= int(a.tokens.min()) and int(a.tokens.max()) < a.vocab_size
    assert a.decode(a.tokens[:2]).split()[0].startswith("k")


def test_synthetic_answers_are_bound_values():
    block = 128
    corpus = associative_recall_corpus(20 * block + 50, seed=3, block_len=block)
    toks, kind = corpus.tokens.tolist(), [s[0] if s != "<q>" else "q" for s in corpus.itos]
    answers = corpus.answer_mask.nonzero().squeeze(1).tolist()
    queries = [i for i, t in enumerate(toks) if kind[t] == "q"]
    assert answers == [i + 2 for i in queries if i + 2 < len(toks)]
    assert len(answers) == 20 * 2
    for t in answers:
        key = toks[t - 1]
        assert kind[key] == "k" and kind[toks[t]] == "v"
        # the binding: the latest earlier occurrence of the key that is not itself a query
        bound = [i for i in range(t - 2) if toks[i] == key and kind[toks[i - 1]] != "q"]
        assert bound and toks[bound[-1] + 1] == toks[t]
        assert bound[-1] // block == t // block  # inside the same block, so inside one window
    fill = [kind[t] for t in toks]
    assert fill.count("w") > 0.8 * len(toks)


def test_loader_shapes_and_windows():
    stream = torch.arange(1000)
    loader = SequenceLoader(stream, seq_len=16, batch_size=4, shuffle=False)
    assert len(loader) == 62 // 4
    first = next(iter(loader))
    assert first.num_graphs == 4 and torch.equal(first.input_ids, torch.arange(64))
    assert torch.equal(first.pos, torch.arange(16).repeat(4))
    assert torch.equal(first.batch, torch.arange(4).repeat_interleave(16))
    assert torch.equal(first.ptr, torch.arange(0, 65, 16))
    for batch in SequenceLoader(stream, 16, 4, seed=5):
        rows = batch.input_ids.view(4, 16)
        assert torch.equal(rows, rows[:, :1] + torch.arange(16)) and (rows[:, 0] % 16 == 0).all()
    assert len(SequenceLoader(stream, 16, 4, drop_last=False)) == 16
    assert [b.num_graphs for b in SequenceLoader(stream, 16, 4, drop_last=False)][-1] == 62 % 4


def test_loader_node_fields():
    corpus = associative_recall_corpus(4096, seed=0)
    extra = torch.randn(4096, 3)
    loader = SequenceLoader(corpus.tokens, 128, 4, node_fields={"answer_mask": corpus.answer_mask, "extra": extra})
    lookup = {tuple(corpus.tokens[i:i + 128].tolist()): i for i in range(0, 4096, 128)}
    for batch in loader:
        assert batch.answer_mask.shape == (512,) and batch.extra.shape == (512, 3)
        for seq, start in zip(batch.input_ids.view(4, 128), batch.ptr[:-1]):
            i = lookup[tuple(seq.tolist())]
            assert torch.equal(batch.answer_mask[start:start + 128], corpus.answer_mask[i:i + 128])
            assert torch.equal(batch.extra[start:start + 128], extra[i:i + 128])


def test_loader_shards_are_disjoint():
    stream, world = torch.arange(100 * 8), 3
    starts = []
    for rank in range(world):
        loader = SequenceLoader(stream, 8, 5, rank=rank, world_size=world, drop_last=False)
        assert len(loader) == 7  # 99 windows used, 33 per rank
        mine = torch.cat([b.input_ids.view(-1, 8)[:, 0] for b in loader]) // 8
        assert (mine % world == rank).all()
        starts += mine.tolist()
    assert sorted(starts) == list(range(99))


def test_loader_resume_is_exact():
    def ids(batches):
        return [b.input_ids.clone() for b in batches]

    stream = torch.randint(50, (40 * 10,))
    reference = SequenceLoader(stream, 10, 3, seed=7)
    full = ids(reference) + ids(reference) + ids(reference)  # three epochs, reshuffled each time
    assert not all(torch.equal(a, b) for a, b in zip(full[:13], full[13:26]))
    for stop in (5, 13, 20):
        loader, seen = SequenceLoader(stream, 10, 3, seed=7), []
        while len(seen) < stop:  # interrupt mid-epoch
            for batch in loader:
                seen.append(batch.input_ids.clone())
                if len(seen) == stop:
                    break
        state = loader.state_dict()
        resumed = SequenceLoader(stream, 10, 3, seed=7)
        resumed.load_state_dict(state)
        while len(seen) < len(full):
            seen += ids(resumed)
        assert all(torch.equal(a, b) for a, b in zip(seen, full))
    loader = SequenceLoader(stream, 10, 3, seed=7)
    loader.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(ids(loader), full[26:]))


def test_loader_errors():
    with pytest.raises(TypeError, match="1-D torch.long"):
        SequenceLoader(torch.zeros(100), 10, 2)
    with pytest.raises(ValueError, match="too short"):
        SequenceLoader(torch.zeros(15, dtype=torch.long), 10, 2, world_size=2)
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        SequenceLoader(torch.zeros(100, dtype=torch.long), 10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="node field 'answer_mask' has 99 rows"):
        SequenceLoader(torch.zeros(100, dtype=torch.long), 10, 2, node_fields={"answer_mask": torch.zeros(99)})


def test_variable_length_batches():
    stream = torch.tensor([5, 3, 0, 7, 0, 0, 4, 4, 4, 4, 4])
    batches = list(variable_length_batches(stream, eos_id=0, batch_size=2))
    assert [b.ptr.tolist() for b in batches] == [[0, 3, 5], [0, 1, 6]]
    assert torch.equal(torch.cat([b.input_ids for b in batches]), stream)
    assert torch.equal(batches[1].pos, torch.tensor([0, 0, 1, 2, 3, 4]))
    cut = list(variable_length_batches(stream, eos_id=0, batch_size=10, max_len=2))
    assert cut[0].ptr.diff().tolist() == [2, 1, 2, 1, 2, 2, 1]


def test_dataset_root_copies_read_only_data_once(tmp_path):
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    (shared / "planetoid" / "Cora" / "raw").mkdir(parents=True)
    (shared / "planetoid" / "Cora" / "raw" / "ind.cora.x").write_text("raw")
    root = dataset_root("planetoid", shared, cache)
    assert root == cache / "planetoid" and (root / "Cora" / "raw" / "ind.cora.x").read_text() == "raw"
    (root / "Cora" / "processed").mkdir()  # what PyG writes stays; the copy is not redone
    assert dataset_root("planetoid", shared, cache) == root and (root / "Cora" / "processed").is_dir()
    assert [p.name for p in cache.iterdir()] == ["planetoid"]  # no staging folder left behind
    missing = dataset_root("geometric_shapes", shared, cache)  # no local copy: PyG downloads into this folder
    assert missing == cache / "geometric_shapes" and not missing.exists()


def test_own_text_vocabularies_never_miss_a_unit(tmp_path):
    """char: every character of every split; word: the training words and <unk> for the rest."""
    (tmp_path / "train.txt").write_text("ab ab\n")
    (tmp_path / "valid.txt").write_text("ab cd\n")
    (tmp_path / "test.txt").write_text("é\n")
    splits = ("train", "validation", "test")
    tok, data = load_data("text", str(tmp_path), splits, tokenizer="char")
    assert tok.itos == ["a", "b", " ", "\n", "c", "d", "é"]  # the training characters keep the first ids
    assert [tok.decode(data[s][0]) for s in splits] == ["ab ab\n", "ab cd\n", "é\n"]
    tok, data = load_data("text", str(tmp_path), splits, tokenizer="word")
    assert tok.decode(data["validation"][0]) == "ab <unk> <eos>"
    with pytest.raises(ValueError, match=r"the validation split: 'c' is not in the vocabulary"):
        load_data("text", str(tmp_path), ("validation",), CharVocab.build(["ab "]))
