"""The fixed-degree fast path: slot mesh = edge mesh, slot attention = MessagePassing attention (anchors
included, as the old anchor-edge formulation), invariants on every backend, no host syncs (compile)."""
import pytest
import torch

from tmt_pyg import DynamicMesh, MeshAttentionConv, TMTConfig, TMTModel
from tmt_pyg.layers.mesh import equal_length_causal_knn, top_slots

from reference import as_set, brute_force_mesh, random_batch


def windowed_reference(x, lengths, k, window):
    """Brute force: the window previous tokens, plus the k most similar tokens before them, plus self."""
    u = torch.nn.functional.normalize(x, dim=-1)
    edges, start = set(), 0
    for n in lengths:
        for i in range(start, start + n):
            near = range(max(start, i - window), i)
            best = sorted(range(start, max(start, i - window)), key=lambda j: -float(u[i] @ u[j]))[:k]
            edges |= {(j, i) for j in list(near) + best} | {(i, i)}
        start += n
    return edges


def test_top_slots_is_exact_and_gives_ties_to_the_latest_column():
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5], [0.3, 0.2, 0.1, 0.0, -1.0]])
    allowed = torch.tensor([[True] * 5, [True, True, False, False, False]])
    index, valid = top_slots(sim, allowed, 3)
    assert sorted(index[0].tolist()) == [1, 2, 4] and valid[0].all()  # 0.9, then the two latest of the tied 0.5s
    assert sorted(index[1, :2].tolist()) == [0, 1] and valid[1].tolist() == [True, True, False]  # only two allowed
    index, valid = top_slots(sim[:, :2], allowed[:, :2], 4)  # fewer columns than k
    assert index.shape == (2, 4) and valid.sum(1).tolist() == [2, 2]


def test_top_slots_without_grad_takes_the_same_slots_in_the_same_order():
    """Inference ranks only the k taken columns unless topk cut a tie; the result must not change."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        R, C, k = torch.randint(1, 20, (3,), generator=g).tolist()
        sim = torch.randint(0, 4, (R, C), generator=g).float() if trial % 2 else torch.randn(R, C, generator=g)
        allowed = torch.rand(R, C, generator=g) > 0.3
        recency = torch.randperm(1000, generator=g)[:C].float().expand(R, C) if trial % 3 == 0 else None
        with torch.no_grad():
            fast = top_slots(sim, allowed, k, recency)
        full = top_slots(sim, allowed, k, recency)
        assert torch.equal(fast[1], full[1])
        assert torch.equal(torch.where(fast[1], fast[0], -1), torch.where(full[1], full[0], -1))


@pytest.mark.parametrize("S,k,block", [(1, 3, 4), (37, 5, 8), (64, 8, 256), (100, 3, 16)])
def test_equal_length_search_equals_brute_force(S, k, block):
    x, batch = random_batch([S] * 3, seed=S)
    index, valid = equal_length_causal_knn(torch.nn.functional.normalize(x, dim=-1).view(3, S, -1), k, block)
    edges = {(b * S + int(j), b * S + i) for b in range(3) for i in range(S) for j, v in zip(index[b, i], valid[b, i]) if v}
    assert edges | {(i, i) for i in range(3 * S)} == brute_force_mesh(x, [S] * 3, k, causal=True)


@pytest.mark.parametrize("backend", ["dense", "cluster"])
@pytest.mark.parametrize("causal", [True, False])
def test_slots_hold_the_edges(backend, causal):
    x, batch = random_batch([30, 9, 17], seed=3)
    mesh = DynamicMesh(4, causal=causal, backend=backend)
    slots = mesh.slots(x, batch)
    assert slots.index.shape == (56, 5) and bool(slots.valid[:, -1].all())
    assert torch.equal(slots.index[:, -1], torch.arange(56))  # the self slot comes last
    assert as_set(slots.edges()[0]) == brute_force_mesh(x, [30, 9, 17], 4, causal)
    if causal and backend == "dense":  # the static-shape search of equal lengths gives the same table
        x3, b3 = random_batch([20] * 3, seed=4)
        regular, flat = mesh.slots(x3, b3, seq_len=20), mesh.slots(x3, b3)
        assert torch.equal(regular.index, flat.index) and torch.equal(regular.valid, flat.valid)


@pytest.mark.parametrize("backend", ["dense", "cluster"])
def test_window_slots_join_the_knn_slots(backend):
    x, batch = random_batch([30, 9, 140], seed=6)
    mesh = DynamicMesh(3, backend=backend, window=4, causal=True)
    slots = mesh.slots(x, batch)
    assert slots.index.shape == (179, 3 + 4 + 1) and str(mesh).endswith("window=4)")
    assert as_set(slots.edges()[0]) == windowed_reference(x, [30, 9, 140], 3, 4)
    x3, b3 = random_batch([40] * 2, seed=7)
    regular, flat = DynamicMesh(3, window=4, causal=True).slots(x3, b3, seq_len=40), DynamicMesh(3, window=4, causal=True).slots(x3, b3)
    assert torch.equal(regular.index, flat.index) and torch.equal(regular.valid, flat.valid)
    with pytest.raises(ValueError, match="causal"):
        DynamicMesh(3, causal=False, window=2)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("separate_queries", [False, True])
def test_active_rows_search_equals_the_full_search(window, separate_queries):
    """Equal lengths with exited rows: the packed search of the active rows gives their rows of the
    full table, also with blocks smaller than a sequence's active rows and a sequence with none."""
    x, batch = random_batch([40] * 3, seed=8)
    query_x = torch.randn_like(x) if separate_queries else None
    active = torch.rand(120, generator=torch.Generator().manual_seed(9)) < 0.6
    active[40:80] = False  # the middle sequence has exited entirely
    target = active.nonzero().view(-1)
    mesh = DynamicMesh(4, window=window, block_size=8, causal=True)
    full = mesh.slots(x, batch, seq_len=40, query_x=query_x)
    part = mesh.slots(x, batch, query_index=target, seq_len=40, query_x=query_x)
    flat = mesh.slots(x, batch, query_index=target, query_x=query_x)  # ragged path, same rows
    assert torch.equal(part.target, target)
    assert torch.equal(part.index, full.index[target]) and torch.equal(part.valid, full.valid[target])
    assert torch.equal(part.index, flat.index) and torch.equal(part.valid, flat.valid)
    assert bool(part.valid[:, :4].any())  # the kNN slots are not all empty


def anchor_edge_reference(conv, x, slots, anchor_x, pos):
    """The pre-fast-path formulation: anchors as timeless nodes of the graph, anchor -> token edges
    through the generic MessagePassing path of the same conv."""
    N, M = x.size(0), anchor_x.size(0)
    edge_index, _ = slots.edges()
    anchors = torch.arange(N, N + M)
    anchor_edges = torch.stack([anchors.repeat(slots.target.numel()), slots.target.repeat_interleave(M)])
    local = torch.full((N + M,), -1)
    local[slots.target] = torch.arange(slots.target.numel())
    edges = torch.cat([edge_index, anchor_edges], 1)
    nodes, node_pos = torch.cat([x, anchor_x]), torch.cat([pos, pos.new_full((M,), -1)])
    return conv((nodes, x[slots.target]), torch.stack([edges[0], local[edges[1]]]), (node_pos, pos[slots.target]))


@pytest.mark.parametrize("decay,rotary,anchors,subset", [(True, True, True, False), (True, False, False, True),
                                                         (False, True, True, True), (True, True, True, True)])
def test_slot_attention_equals_message_passing(decay, rotary, anchors, subset):
    torch.manual_seed(2)
    x, batch = random_batch([25, 15], dim=32, seed=5, dtype=torch.float32)
    pos = torch.cat([torch.arange(25), torch.arange(15)])
    query = torch.tensor([0, 3, 7, 24, 25, 30, 39]) if subset else None
    slots = DynamicMesh(5, causal=True).slots(x, batch, query)
    conv = MeshAttentionConv(32, 8, heads=4, decay=decay, rotary=rotary, max_seq_len=16).eval()
    with torch.no_grad():
        conv.decay is not None and conv.decay.omega.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
    anchor_x = torch.randn(3 if anchors else 0, 32)
    key, value = conv.project_key_value(x, pos)
    memory = conv.project_key_value(anchor_x, pos.new_full((anchor_x.size(0),), -1)) if anchors else None
    t = slots.target
    fast, alpha = conv.attend_slots(conv.project_query(x[t], pos[t]), key, value, slots.index, slots.valid, (pos, pos[t]), memory)
    torch.testing.assert_close(fast, anchor_edge_reference(conv, x, slots, anchor_x, pos), atol=1e-5, rtol=1e-5)
    assert alpha.shape == (t.numel(), 6 + anchor_x.size(0), 4)
    assert bool((alpha[:, :6][~slots.valid] == 0).all())  # unused slots get no weight


SMALL = dict(vocab_size=97, d_model=64, n_heads=4, n_layers=3, graph_k=8, ffn_stream_dim=64, mlp_dim=64,
             memory_anchors=4, max_seq_len=300, dropout=0.0, use_exit=False)


@pytest.mark.parametrize("backend,window,similarity", [("dense", 0, "state"), ("cluster", 0, "state"), ("dense", 4, "state"),
                                                       ("cluster", 4, "state"), ("dense", 4, "attention"), ("cluster", 0, "attention")])
def test_causal_and_batch_invariant_on_every_backend(backend, window, similarity, device):
    """The issue's case: S=300, d=64, 3 layers, eval; vocab 97 repeats tokens, so exact ties abound."""
    torch.manual_seed(0)
    model = TMTModel(TMTConfig(**SMALL, mesh_backend=backend, mesh_window=window, mesh_similarity=similarity)).eval().to(device)
    ids = torch.randint(0, 97, (3, 300)).to(device)
    with torch.no_grad():
        together = model(ids).logits
        alone = model(ids[1:2]).logits
        changed = ids[1:2].clone()
        changed[0, 200:] = torch.randint(0, 97, (100,)).to(device)
        future = model(changed).logits
        ragged = model([ids[0, :250], ids[1], ids[2, :40]]).logits
    assert torch.equal(together[1], alone[0])
    assert torch.equal(future[0, :200], alone[0, :200])
    torch.testing.assert_close(ragged[250:550], alone[0])  # the flat search of ragged batches agrees


def test_anchor_rows_are_shared_and_read_only_in_causal_mode():
    model = TMTModel(TMTConfig(**SMALL)).eval()
    out = model(torch.randint(0, 97, (2, 20)), output_hidden_states=True)
    assert all(h.shape == (40 + 4, 64) for h in out.hidden_states)  # M rows for the whole batch
    other = model(torch.randint(0, 97, (2, 20)), output_hidden_states=True)
    assert torch.equal(out.hidden_states[-1][40:], other.hidden_states[-1][40:])


@pytest.mark.parametrize("options", [{}, {"layer_dropout": 0.5, "search_heads": 1, "exit_loss_weight": 0.5, "exit_loss_sample": 64,
                                      "exit_loss_layers": 1},
                                     {"graph_k": 0, "mesh_window": 4}, {"mesh_explore": 4}])
def test_training_forward_compiles_as_one_graph(options):
    torch.manual_seed(0)
    model = TMTModel(TMTConfig(**{**SMALL, "max_seq_len": 64, "use_exit": True, **options}))
    ids = torch.randint(0, 97, (8, 48))

    def loss_of(m):
        torch.manual_seed(1)  # the gate objective samples tokens
        out = m(ids, compute_loss=True)
        return out.loss, out.logits

    anchors = model.anchors.anchor_state.clone()
    eager_loss, eager_logits = loss_of(model)
    model.anchors.anchor_state.copy_(anchors)  # the EMA step ran in training mode
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, logits = loss_of(compiled)
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
