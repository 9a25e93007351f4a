"""Catalogue of bad inputs: each one gets the natural exception type and a message naming the problem
(docs/design.md: "never a silent wrong answer"). Edge cases that are valid input (k above the number of
candidates) are checked to work here too."""
import pytest
import torch

from tmt_pyg import DynamicMesh, MeshAttentionConv, MeshGPSConv, TMTConfig, TMTModel, tokens_to_batch
from tmt_pyg.data import CharVocab, SequenceLoader, load_text_splits, variable_length_batches
from tmt_pyg.hf import TMTForCausalLM, TMTHFConfig

SMALL = dict(vocab_size=50, d_model=16, n_heads=2, n_layers=2, graph_k=3, ffn_stream_dim=16, mlp_dim=16,
             memory_anchors=2, max_seq_len=16, dropout=0.0)
IDS = torch.tensor([[1, 2, 3, 4]])


def make_model(**overrides) -> TMTModel:
    return TMTModel(TMTConfig(**{**SMALL, **overrides})).eval()


@pytest.fixture(scope="module")
def model() -> TMTModel:
    return make_model()


@pytest.mark.parametrize("tokens,error,match", [
    pytest.param(IDS.float(), TypeError, r"input_ids must be a torch.long tensor, got dtype torch.float32", id="float-ids"),
    pytest.param(IDS.int(), TypeError, r"got dtype torch.int32", id="int32-ids"),
    pytest.param(torch.tensor([[1, -2, 3]]), ValueError, r"negative id \(-2\)", id="negative-id"),
    pytest.param(torch.tensor([[1, 50, 3]]), ValueError, r"id 50, out of range for vocab_size=50", id="id-out-of-range"),
    pytest.param(torch.zeros(0, 5, dtype=torch.long), ValueError, r"empty batch: got shape \(0, 5\)", id="empty-tensor"),
    pytest.param([], ValueError, r"empty batch: got an empty list", id="empty-list"),
    pytest.param([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], ValueError, r"sequence 1 is empty",
                 id="empty-sequence"),
    pytest.param(torch.tensor([1, 2, 3]), ValueError, r"expected a \(B, S\) tensor", id="1d-tensor"),
    pytest.param([[1, 2, 3]], TypeError, r"sequence 0 must be a 1-D tensor", id="list-of-lists"),
    pytest.param(torch.ones(1, 17, dtype=torch.long), ValueError, r"sequence of length 17 exceeds max_seq_len=16",
                 id="longer-than-max-seq-len"),
    pytest.param([torch.tensor([1]), torch.tensor([2], device="meta")], ValueError,
                 r"sequence 1 is on meta but sequence 0 on cpu", id="sequences-on-two-devices"),
    pytest.param(IDS.to("meta"), ValueError, r"input_ids is on meta but the model is on cpu", id="input-on-other-device"),
])
def test_bad_tokens(model, tokens, error, match):
    with pytest.raises(error, match=match):
        model(tokens)


def corrupt(**fields):
    """A valid two-sequence Batch (lengths 3 and 2) with some fields replaced (None: deleted)."""
    data = tokens_to_batch([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
    for name, value in fields.items():
        if value is None:
            del data[name]
        else:
            data[name] = value
    return data


@pytest.mark.parametrize("fields,error,match", [
    pytest.param(dict(pos=None), ValueError, r"the Batch has no node field 'pos'", id="no-pos"),
    pytest.param(dict(input_ids=None), ValueError, r"no node field 'input_ids'", id="no-input-ids"),
    pytest.param(dict(batch=torch.tensor([0, 1, 0, 1, 1])), ValueError, r"batch vector must be sorted", id="unsorted-batch"),
    pytest.param(dict(batch=torch.tensor([0, 0, 0, 2, 2]), ptr=None), ValueError, r"number the 2 graphs 0\.\.1 without gaps",
                 id="batch-with-gap"),
    pytest.param(dict(batch=torch.zeros(5)), TypeError, r"batch must be a torch.long tensor", id="float-batch"),
    pytest.param(dict(batch=torch.tensor([0, 0, 0, 1])), ValueError, r"batch must be a node vector like input_ids",
                 id="short-batch"),
    pytest.param(dict(ptr=torch.tensor([0, 2, 5])), ValueError, r"ptr does not match the batch vector", id="ptr-mismatch"),
    pytest.param(dict(ptr=torch.tensor([0, 3, 4, 5])), ValueError, r"ptr has 4 entries for 2 graphs", id="ptr-length"),
    pytest.param(dict(pos=torch.arange(5)), ValueError, r"pos must count 0, 1, 2, ... inside every sequence",
                 id="global-positions"),
    pytest.param(dict(pos=torch.tensor([0, 1, -1, 0, 1])), ValueError, r"pos must count", id="negative-position"),
    pytest.param(dict(input_ids=torch.zeros(0, dtype=torch.long), pos=torch.zeros(0, dtype=torch.long),
                      batch=torch.zeros(0, dtype=torch.long), ptr=None), ValueError, r"empty batch: no tokens",
                 id="empty-batch"),
    pytest.param(dict(pos=torch.arange(5, device="meta")), ValueError, r"pos is on meta but the model is on cpu",
                 id="field-on-other-device"),
])
def test_bad_batch(model, fields, error, match):
    with pytest.raises(error, match=match):
        model(corrupt(**fields))


@pytest.mark.parametrize("kwargs,error,match", [
    pytest.param(dict(k=0), ValueError, r"k \(graph_k\) must be an integer >= 1, got 0", id="k-zero"),
    pytest.param(dict(k=-1), ValueError, r"got -1", id="k-negative"),
    pytest.param(dict(k=2.0), ValueError, r"got 2\.0", id="k-float"),
    pytest.param(dict(k=True), ValueError, r"got True", id="k-bool"),
    pytest.param(dict(k=2, backend="gpu"), ValueError, r"unknown mesh backend 'gpu'", id="unknown-backend"),
])
def test_bad_mesh_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicMesh(**kwargs)


X = torch.randn(3, 4)
NAN, INF = X.clone(), X.clone()
NAN[1, 2], INF[2, 0] = float("nan"), float("inf")


@pytest.mark.parametrize("args,error,match", [
    pytest.param((X.long(),), TypeError, r"x must be a floating \(N, D\) tensor, got torch.int64", id="integer-states"),
    pytest.param((X[0],), TypeError, r"floating \(N, D\) tensor, got torch.float32 \(4,\)", id="1d-states"),
    pytest.param((X[:0],), ValueError, r"empty input: x has no nodes", id="no-nodes"),
    pytest.param((NAN,), ValueError, r"non-finite node states \(NaN or Inf\)", id="nan-states"),
    pytest.param((INF,), ValueError, r"non-finite node states", id="inf-states"),
    pytest.param((X, torch.tensor([1, 0, 0])), ValueError, r"batch vector must be sorted", id="unsorted-batch"),
    pytest.param((X, torch.tensor([-1, 0, 0])), ValueError, r"sorted and non-negative", id="negative-batch"),
    pytest.param((X, torch.tensor([0, 0])), ValueError, r"batch has 2 entries for 3 nodes", id="short-batch"),
    pytest.param((X, torch.zeros(3)), TypeError, r"batch must be a 1-D torch.long tensor", id="float-batch"),
    pytest.param((X, torch.zeros(3, dtype=torch.long, device="meta")), ValueError, r"batch is on meta but x is on cpu",
                 id="batch-on-other-device"),
    pytest.param((X, None, torch.tensor([0, 3])), ValueError, r"query_index must hold strictly increasing node ids in \[0, 3\)",
                 id="query-out-of-range"),
    pytest.param((X, None, torch.tensor([2, 0])), ValueError, r"strictly increasing", id="query-unsorted"),
])
def test_bad_mesh_input(args, error, match):
    with pytest.raises(error, match=match):
        DynamicMesh(2, causal=True)(*args)


@pytest.mark.parametrize("backend", ["dense", "cluster"])
@pytest.mark.parametrize("causal", [True, False])
def test_k_above_the_number_of_candidates_takes_them_all(backend, causal):
    """Not an error (DESIGN.md): a token with fewer than k candidates gets all of them, plus its self edge."""
    lengths, x = [4, 1, 6], torch.randn(11, 5)
    edge_index, _ = DynamicMesh(10, causal=causal, backend=backend)(x, torch.tensor([0] * 4 + [1] + [2] * 6))
    per_target = torch.bincount(edge_index[1], minlength=11).tolist()
    expected = [i + 1 if causal else n for n in lengths for i in range(n)]
    assert per_target == expected


def test_k_above_the_context_equals_dense_attention():
    """With graph_k >= every context the mesh is the full causal graph: the states of use_mesh=False.
    (Without anchors: the dense path lets anchors read each other, the mesh gives them self edges only.)"""
    mesh = make_model(graph_k=SMALL["max_seq_len"], use_anchors=False)
    dense = make_model(use_mesh=False, use_anchors=False)
    dense.load_state_dict(mesh.state_dict())
    ids = [torch.randint(0, 50, (n,)) for n in (7, 16, 1)]
    for a, b in zip(mesh(ids, output_hidden_states=True).hidden_states, dense(ids, output_hidden_states=True).hidden_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


EDGES = torch.tensor([[0, 1], [1, 1]])


@pytest.mark.parametrize("args,error,match", [
    pytest.param((X, EDGES), ValueError, r"needs node positions `pos`", id="no-positions"),
    pytest.param((X, EDGES.to("meta"), torch.arange(3)), ValueError, r"edge_index is on meta but x is on cpu",
                 id="edges-on-other-device"),
    pytest.param((X, EDGES, torch.arange(3, device="meta")), ValueError, r"pos is on meta but x is on cpu",
                 id="pos-on-other-device"),
])
def test_bad_conv_input(args, error, match):
    with pytest.raises(error, match=match):
        MeshAttentionConv(4, 2, heads=2, decay=True)(*args)


@pytest.mark.parametrize("field,value,error,match", [
    pytest.param("n_heads", 3, ValueError, r"d_model \(16\) must be divisible by n_heads \(3\)", id="heads-not-dividing"),
    pytest.param("graph_k", -1, ValueError, r"graph_k must be a positive integer, got -1", id="graph-k-negative"),
    pytest.param("graph_k", 2.5, TypeError, r"graph_k must be int, got 2\.5", id="graph-k-float"),
    pytest.param("dropout", -0.1, ValueError, r"dropout must lie in \[0, 1\), got -0\.1", id="negative-dropout"),
    pytest.param("exit_threshold", 0.0, ValueError, r"exit_threshold must lie in \(0, 1\], got 0\.0", id="exit-zero"),
    pytest.param("exit_threshold", 1.5, ValueError, r"exit_threshold must lie in \(0, 1\]", id="exit-above-one"),
    pytest.param("exit_threshold", "high", TypeError, r"exit_threshold must be float, got 'high'", id="exit-string"),
    pytest.param("d_model", True, TypeError, r"d_model must be int, got True", id="bool-width"),
    pytest.param("vocab_size", 0, ValueError, r"vocab_size must be a positive integer", id="vocab-zero"),
    pytest.param("mesh_backend", "gpu", ValueError, r"mesh_backend must be one of", id="unknown-backend"),
    pytest.param("gate_loss_weight", -1.0, ValueError, r"gate_loss_weight must be >= 0", id="negative-gate-weight"),
    pytest.param("gate_sample", 0, ValueError, r"gate_sample must be a positive integer", id="gate-sample-zero"),
])
def test_bad_config(field, value, error, match):
    with pytest.raises(error, match=f"TMTConfig: {match}"):
        TMTConfig(**{**SMALL, field: value})


def test_window_only_mesh_needs_a_window():
    assert TMTConfig(**{**SMALL, "graph_k": 0}).mesh_window == 8  # the causal default window: a valid control
    with pytest.raises(ValueError, match=r"graph_k must be a positive integer, got 0 \(0, a window-only mesh, needs mesh_window >= 1"):
        TMTConfig(**{**SMALL, "graph_k": 0, "mesh_window": 0})
    with pytest.raises(ValueError, match=r"k \(graph_k\) must be an integer >= 1, got 0 \(0, a window-only mesh, needs window"):
        DynamicMesh(0, causal=True)
    slots = DynamicMesh(0, causal=True, window=2).slots(torch.randn(5, 4))
    assert slots.index.tolist() == [[0, 0, 0], [1, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]  # invalid: the target
    assert slots.valid.tolist() == [[False, False, True], [False, True, True]] + [[True, True, True]] * 3


def test_unknown_config_key():
    with pytest.raises(ValueError, match=r"TMTConfig: unknown field\(s\) \['heads'\]"):
        TMTConfig.from_dict({**SMALL, "heads": 2})


@pytest.mark.parametrize("overrides,match", [
    pytest.param({}, r"non-finite hidden states \(NaN or Inf\) after the last layer", id="mesh"),
    pytest.param(dict(use_mesh=False), r"non-finite hidden states \(NaN or Inf\) after the last layer", id="dense"),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hidden_states(overrides, match, value):
    model = make_model(**overrides)
    with torch.no_grad():
        model.wte.weight[3] = value
    model(torch.tensor([[1, 2, 4]]))  # token 3 absent: fine
    with pytest.raises(ValueError, match=match):
        model(torch.tensor([[1, 3, 4]]))


def test_loss_needs_a_target(model):
    with pytest.raises(ValueError, match=r"no next-token targets: every sequence has length 1"):
        model([torch.tensor([1]), torch.tensor([2])], compute_loss=True)


def test_tokenizer_larger_than_the_model_vocabulary():
    vocab = CharVocab.build(["the quick brown fox"])  # 13 symbols with "\n"
    ids = vocab.encode(["quick fox"])
    with pytest.raises(ValueError, match=rf"id {int(ids.max())}, out of range for vocab_size=10"):
        tokens_to_batch([ids], vocab_size=10)
    with pytest.raises(ValueError, match=r"out of range for vocab_size=10"):
        make_model(vocab_size=10)([ids])


def test_missing_and_empty_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data directory .*nowhere does not exist"):
        load_text_splits("wikitext-2", str(tmp_path / "nowhere"))
    (tmp_path / "valid.txt").write_text("a b\n")
    with pytest.raises(FileNotFoundError, match=r"train\.txt not found"):
        load_text_splits("wikitext-2", str(tmp_path))
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(ValueError, match=r"train\.txt is empty"):
        load_text_splits("wikitext-2", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown hub corpus 'penn-treebank'"):
        load_text_splits("penn-treebank")


@pytest.mark.parametrize("make,error,match", [
    pytest.param(lambda: SequenceLoader(torch.zeros(0, dtype=torch.long), 4, 2), ValueError, r"empty stream",
                 id="loader-empty-stream"),
    pytest.param(lambda: next(variable_length_batches(torch.zeros(0, dtype=torch.long), 0, 2)), ValueError,
                 r"empty stream", id="ragged-empty-stream"),
    pytest.param(lambda: next(variable_length_batches(torch.zeros(5), 0, 2)), TypeError, r"1-D torch.long",
                 id="ragged-float-stream"),
    pytest.param(lambda: next(variable_length_batches(torch.arange(5), 0, 0)), ValueError,
                 r"batch_size \(0\) and max_len \(None\) must be positive", id="ragged-batch-size-zero"),
    pytest.param(lambda: next(variable_length_batches(torch.arange(5), 0, 2, max_len=0)), ValueError,
                 r"max_len \(0\) must be positive", id="ragged-max-len-zero"),
])
def test_bad_loader_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.fixture(scope="module")
def hf_model() -> TMTForCausalLM:
    return TMTForCausalLM(TMTHFConfig(**SMALL)).eval()


@pytest.mark.parametrize("kwargs,error,match", [
    pytest.param(dict(input_ids=IDS.float()), TypeError, r"input_ids must be a torch.long tensor", id="float-ids"),
    pytest.param(dict(input_ids=IDS + 49), ValueError, r"id 53, out of range for vocab_size=50", id="id-out-of-range"),
    pytest.param(dict(input_ids=IDS, attention_mask=torch.ones(2, 4)), ValueError,
                 r"attention_mask of shape \(2, 4\) does not cover input_ids of shape \(1, 4\)", id="mask-rows"),
    pytest.param(dict(input_ids=IDS, attention_mask=torch.ones(1, 3)), ValueError, r"does not cover", id="mask-short"),
    pytest.param(dict(input_ids=IDS, labels=IDS[:, :3]), ValueError,
                 r"labels must have the shape of input_ids \(1, 4\), got \(1, 3\)", id="labels-shape"),
    pytest.param(dict(input_ids=IDS, attention_mask=torch.zeros(1, 4)),
                 ValueError, r"every row needs at least one token with attention_mask 1", id="all-masked"),
])
def test_bad_hf_input(hf_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        hf_model(**kwargs)


def test_graph_layers_default_to_what_a_graph_user_expects():
    """On a point cloud the default mesh is bidirectional, so it does not depend on the node order, and
    the default conv needs no token positions."""
    pos = torch.randn(12, 3)
    perm = torch.randperm(12)
    mesh = DynamicMesh(k=2)
    edges = {tuple(e) for e in mesh(pos)[0].t().tolist()}
    permuted = {(int(perm[s]), int(perm[t])) for s, t in mesh(pos[perm])[0].t().tolist()}
    assert edges == permuted and not mesh.causal
    conv = MeshAttentionConv(3, 4, heads=2)
    assert conv.decay is None and conv(pos, mesh(pos)[0]).shape == (12, 8)


@pytest.mark.parametrize("args,match", [
    pytest.param((X, EDGES, torch.randn(3, 3)), r"pos must hold one token position per node, shape \(3,\), got \(3, 3\)",
                 id="point-coordinates-as-positions"),
    pytest.param((X, EDGES, torch.arange(2)), r"pos must hold one token position per node, shape \(3,\), got \(2,\)",
                 id="too-few-positions"),
    pytest.param((NAN, EDGES, torch.arange(3)), r"x holds NaN or Inf values \(1 rows\)", id="nan-features"),
    pytest.param((INF, EDGES, torch.arange(3)), r"x holds NaN or Inf values", id="inf-features"),
])
def test_conv_input_that_would_fail_deep_inside(args, match):
    with pytest.raises(ValueError, match=match):
        MeshAttentionConv(4, 2, heads=2, decay=True)(*args)


@pytest.mark.parametrize("channels,coord,match", [
    pytest.param(3, None, r"coord_channels=3\) needs node coordinates `coord` of shape \(3, 3\), got None", id="no-coord"),
    pytest.param(3, torch.randn(3, 2), r"of shape \(3, 3\), got \(3, 2\)", id="coord-wrong-width"),
    pytest.param(3, torch.tensor([[0.0, 1, 2], [float("nan"), 0, 0], [1, 1, 1]]), r"coord holds NaN or Inf values \(1 rows\)",
                 id="nan-coord"),
    pytest.param(0, torch.randn(3, 3), r"`coord` given, but the layer encodes no coordinates", id="coord-unused"),
])
def test_bad_coordinates(channels, coord, match):
    with pytest.raises(ValueError, match=match):
        MeshAttentionConv(4, 2, heads=2, coord_channels=channels)(X, EDGES, coord=coord)


def test_gps_layer_names_the_bad_argument():
    layer = MeshGPSConv(4, None, heads=2, k=2)
    with pytest.raises(ValueError, match=r"x holds non-finite node states"):
        layer(NAN, EDGES)
    with pytest.raises(ValueError, match=r"batch has 2 entries for 3 nodes"):
        layer(X, EDGES, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"k \(graph_k\) must be an integer >= 1, got 0"):
        MeshGPSConv(4, None, heads=2, k=0)
