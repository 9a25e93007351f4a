"""Property tests (hypothesis) of the DESIGN.md invariants of DynamicMesh and MeshAttentionConv over random
batch compositions, k, heads, backends and dtypes. Derandomized: every run tests the same examples."""
import copy

import torch
import torch.nn.functional as F
import torch_cluster
from hypothesis import given, settings, strategies as st

from tmt_pyg import DynamicMesh, MeshAttentionConv

from reference import as_set, brute_force_mesh, dense_reference, random_batch

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)
# slack for near-ties in the top-k check and for outputs against a float64 reference
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 5e-2}

lengths_st = st.lists(st.integers(1, 32), min_size=1, max_size=4)  # sequences of unequal lengths per batch
backends = st.sampled_from(["dense", "cluster"])
block_sizes = st.integers(1, 64)  # query rows per block of the dense backend: blocks split sequences
seeds = st.integers(0, 2**16)


def positions(batch):
    """Position of every node inside its own sequence."""
    start = torch.cat([batch.new_zeros(1), torch.bincount(batch).cumsum(0)])
    return torch.arange(batch.numel()) - start[batch]


@SETTINGS
@given(lengths=lengths_st, k=st.integers(1, 8), dim=st.integers(2, 12), causal=st.booleans(), backend=backends,
       block_size=block_sizes, dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), seed=seeds)
def test_mesh_is_the_exact_top_k_of_its_own_sequence(device, lengths, k, dim, causal, backend, block_size, dtype, seed):
    x, batch = random_batch(lengths, dim, seed, dtype)
    mesh = DynamicMesh(k, causal=causal, backend=backend, block_size=block_size)
    edge_index, edge_sim = (t.cpu() for t in mesh(x.to(device), batch.to(device)))
    src, dst = edge_index
    N, idx = x.size(0), torch.arange(x.size(0))
    candidate = (batch[:, None] == batch[None, :]) & ((idx[None, :] < idx[:, None]) if causal else (idx[None, :] != idx[:, None]))
    chosen = torch.zeros(N, N, dtype=torch.bool)
    chosen[dst, src] = True  # [target, source]
    assert edge_index.size(1) == len(as_set(edge_index))  # no duplicate edges
    assert bool(chosen.diagonal().all())  # every node has its self edge
    chosen.fill_diagonal_(False)
    assert not bool((chosen & ~candidate).any())  # no edge crosses sequences, none from the future (causal)
    num_candidates = candidate.sum(1)
    assert torch.equal(torch.bincount(dst, minlength=N), num_candidates.clamp(max=k) + 1)
    u = F.normalize(x.double(), dim=-1)
    cos = u @ u.t()  # every chosen neighbour is at least as similar as every candidate left out
    lowest_chosen = cos.masked_fill(~chosen, float("inf")).amin(1)
    highest_left_out = cos.masked_fill(~(candidate & ~chosen), float("-inf")).amax(1)
    assert bool((lowest_chosen >= highest_left_out - TOL[dtype]).all())
    torch.testing.assert_close(edge_sim.double(), cos[dst, src], atol=TOL[dtype] * 10, rtol=0)
    if dtype == torch.float64:  # no ties to worry about: exactly the brute-force edge set
        assert as_set(edge_index) == brute_force_mesh(x, lengths, k, causal)


@SETTINGS
@given(lengths=lengths_st, k=st.integers(1, 8), dim=st.integers(2, 12), backend=backends, seed=seeds)
def test_bidirectional_mesh_is_torch_cluster_knn_graph(lengths, k, dim, backend, seed):
    x, batch = random_batch(lengths, dim, seed)
    edge_index, _ = DynamicMesh(k, causal=False, backend=backend)(x, batch)
    knn = torch_cluster.knn_graph(F.normalize(x, dim=-1), k, batch=batch, loop=False, flow="source_to_target")
    assert as_set(edge_index) == as_set(knn) | {(i, i) for i in range(x.size(0))}


def make_conv(dim, channels, heads, decay, rotary, dtype, seed):
    torch.manual_seed(seed)
    conv = MeshAttentionConv(dim, channels, heads=heads, decay=decay, rotary=rotary, max_seq_len=32).eval()
    if decay:  # distinct rates per head, fast enough that the decay matters over 20 positions
        torch.nn.init.uniform_(conv.decay.omega, -1.0, 3.0)
    return conv.to(dtype)


@SETTINGS
@given(lengths=lengths_st, k=st.integers(1, 6), heads=st.integers(1, 4), channels=st.sampled_from([2, 4, 6]),
       decay=st.booleans(), rotary=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       seed=seeds)
def test_conv_equals_dense_masked_attention(device, lengths, k, heads, channels, decay, rotary, dtype, seed):
    dim = 8
    conv = make_conv(dim, channels, heads, decay, rotary, dtype, seed)
    x, batch = random_batch(lengths, dim, seed, dtype)
    pos = positions(batch)
    edge_index, _ = DynamicMesh(k, causal=True)(x, batch)
    with torch.no_grad():  # float64 copy of the same weights
        expected = dense_reference(copy.deepcopy(conv).double(), x.double(), edge_index, pos)
    out, (_, alpha) = conv.to(device)(*(t.to(device) for t in (x, edge_index, pos)), return_attention_weights=True)
    assert out.dtype == dtype and alpha.shape == (edge_index.size(1), heads)
    torch.testing.assert_close(out.double().cpu(), expected, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


layer_args = dict(lengths=st.lists(st.integers(1, 32), min_size=2, max_size=4), k=st.integers(1, 6),
                  heads=st.sampled_from([1, 2, 4]), backend=backends, block_size=block_sizes,
                  dtype=st.sampled_from([torch.float64, torch.float32]), seed=seeds, data=st.data())


def two_layer_setup(device, lengths, k, heads, backend, block_size, dtype, seed, data):
    """Two mesh + rotary/decayed conv layers on ``device`` (mesh rebuilt from the current states before
    each, as in a TMT stack), random states of the batch, and a sequence drawn from it: (layers, x,
    batch, start, end); ``layers`` takes and returns CPU tensors."""
    convs = [make_conv(4 * heads, 4, heads, True, True, dtype, seed + i).to(device) for i in range(2)]
    mesh = DynamicMesh(k, backend=backend, block_size=block_size, causal=True)

    def layers(x, batch):
        pos, x, batch = positions(batch).to(device), x.to(device), batch.to(device)
        for conv in convs:
            x = conv(x, mesh(x, batch)[0], pos)
        return x.cpu()

    x, batch = random_batch(lengths, 4 * heads, seed, dtype)
    s = data.draw(st.integers(0, len(lengths) - 1), label="sequence")
    return layers, x, batch, sum(lengths[:s]), sum(lengths[:s + 1])


@SETTINGS
@given(**layer_args)
def test_a_sequence_alone_or_in_a_batch_gives_the_same_rows(device, dtype, **args):
    layers, x, batch, a, b = two_layer_setup(device, dtype=dtype, **args)
    alone = layers(x[a:b], torch.zeros(b - a, dtype=torch.long))
    torch.testing.assert_close(layers(x, batch)[a:b], alone, atol=TOL[dtype], rtol=TOL[dtype])


@SETTINGS
@given(**layer_args)
def test_later_tokens_never_change_earlier_outputs(device, dtype, seed, data, **args):
    layers, x, batch, a, b = two_layer_setup(device, dtype=dtype, seed=seed, data=data, **args)
    first = a + 1 + data.draw(st.integers(0, b - a - 1), label="position")  # perturb the tokens after it
    changed = x.clone()
    changed[first:b] = torch.randn(b - first, x.size(1), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    keep = torch.ones(x.size(0), dtype=torch.bool)
    keep[first:b] = False  # earlier tokens of that sequence and every other sequence stay put
    torch.testing.assert_close(layers(changed, batch)[keep], layers(x, batch)[keep], atol=TOL[dtype], rtol=TOL[dtype])
