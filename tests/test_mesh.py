import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tmt_pyg import DynamicMesh, tokens_to_batch

from reference import as_set, brute_force_mesh, random_batch


@pytest.mark.parametrize("backend", ["dense", "cluster"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths,k", [([7], 3), ([5, 12, 1, 9], 4), ([30, 3, 17], 8), ([200, 150], 5)])
def test_mesh_equals_brute_force(backend, causal, lengths, k):
    x, batch = random_batch(lengths, seed=len(lengths) + k)
    edge_index, sim = DynamicMesh(k, causal=causal, backend=backend)(x, batch)
    assert as_set(edge_index) == brute_force_mesh(x, lengths, k, causal)
    assert edge_index.size(1) == len(as_set(edge_index))  # no duplicate edges
    u = F.normalize(x, dim=-1)
    torch.testing.assert_close(sim, (u[edge_index[0]] * u[edge_index[1]]).sum(-1))


def test_cluster_chunks_cross_the_prefix_boundary():
    """Sequences longer than one torch-cluster chunk (128) exercise the prefix-kNN + chunk merge."""
    x, batch = random_batch([300, 260], dim=8, seed=3)
    dense = as_set(DynamicMesh(6, backend="dense", causal=True)(x, batch)[0])
    cluster = as_set(DynamicMesh(6, backend="cluster", causal=True)(x, batch)[0])
    assert dense == cluster



def test_without_torch_cluster(monkeypatch):
    """Where torch-cluster is not built: the cluster backend says how to get it, ``auto`` searches dense."""
    x, batch = random_batch([20, 15], dim=3, seed=2)
    dense = as_set(DynamicMesh(4, causal=False, backend="dense")(x, batch)[0])
    auto = DynamicMesh(4, causal=False)
    assert auto.resolve_backend(3) == "cluster"
    monkeypatch.setitem(sys.modules, "torch_cluster", None)  # `import torch_cluster` now raises ImportError
    with pytest.raises(ImportError, match="torch-cluster is not installed: run `make setup`"):
        DynamicMesh(4, causal=False, backend="cluster")(x, batch)
    assert auto.resolve_backend(3) == "dense" and as_set(auto(x, batch)[0]) == dense


def test_layers_import_without_torch_cluster():
    code = "import sys; sys.modules['torch_cluster'] = None; import tmt_pyg; print(tmt_pyg.TMTModel(tmt_pyg.TMTConfig()).mesh)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("DynamicMesh(")


def test_causal_mesh_ignores_the_future():
    x, batch = random_batch([40], seed=1)
    edges = as_set(DynamicMesh(4, causal=True)(x, batch)[0])
    x2 = x.clone()
    x2[25:] = torch.randn(15, x.size(1), dtype=x.dtype)
    edges2 = as_set(DynamicMesh(4, causal=True)(x2, batch)[0])
    assert {e for e in edges if e[1] < 25} == {e for e in edges2 if e[1] < 25}
    assert all(src <= dst for src, dst in edges)


def test_fewer_candidates_than_k_and_self_edges():
    x, batch = random_batch([3], seed=2)
    edge_index, sim = DynamicMesh(8, causal=True)(x, batch)
    assert as_set(edge_index) == {(0, 0), (1, 1), (0, 1), (2, 2), (0, 2), (1, 2)}
    torch.testing.assert_close(sim[edge_index[0] == edge_index[1]], torch.ones(3, dtype=x.dtype))


def test_query_index_restricts_targets():
    x, batch = random_batch([20, 10], seed=4)
    mesh = DynamicMesh(3, causal=True)
    full = as_set(mesh(x, batch)[0])
    query = torch.tensor([2, 5, 19, 21, 29])
    sub = as_set(mesh(x, batch, query_index=query)[0])
    assert sub == {e for e in full if e[1] in set(query.tolist())}


def test_batch_invariance_of_the_mesh():
    x, batch = random_batch([9, 14], seed=5)
    both = as_set(DynamicMesh(4, causal=True)(x, batch)[0])
    alone = as_set(DynamicMesh(4, causal=True)(x[9:], batch[9:] - 1)[0])
    assert {(s - 9, d - 9) for s, d in both if d >= 9} == alone


def test_mesh_works_on_a_pyg_batch():
    batch = tokens_to_batch([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
    x = torch.randn(batch.num_nodes, 8)
    edge_index, _ = DynamicMesh(2, causal=True)(x, batch.batch)
    assert int(edge_index.max()) < 5


def test_exact_ties_go_to_the_most_recent_candidates():
    x = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]])  # six identical states, then another
    edge_index, _ = DynamicMesh(2, backend="dense", causal=True)(x)
    assert {s for s, d in as_set(edge_index) if d == 5 and s != d} == {3, 4}
    shifted = torch.cat([torch.tensor([[0.0, 1.0]] * 3), x])  # same sequence inside a longer block
    edge_index, _ = DynamicMesh(2, backend="dense", causal=True)(shifted, torch.tensor([0] * 3 + [1] * 7))
    assert {s - 3 for s, d in as_set(edge_index) if d == 8 and s != d} == {3, 4}


@pytest.mark.parametrize("backend", ["dense", "cluster"])
def test_separate_query_vectors_pick_the_past_keys_they_score_highest(backend):
    """query_x: target i reads the k past nodes j whose unit vectors u_j score highest against its
    own unit query q_i (the attention-similarity mesh), on the regular and on the flat search."""
    torch.manual_seed(0)
    keys, queries = torch.randn(2 * 30, 16), torch.randn(2 * 30, 16)
    batch = torch.arange(2).repeat_interleave(30)
    mesh = DynamicMesh(4, causal=True, backend=backend)
    for seq_len in (30, None):
        slots = mesh.slots(keys, batch, None, seq_len if backend == "dense" else None, query_x=queries)
        uk, uq = F.normalize(keys, dim=-1), F.normalize(queries, dim=-1)
        for i in (3, 17, 29, 45, 59):
            start = 30 * (i // 30)
            expected = set((start + (uq[i] @ uk[start:i].t()).topk(min(4, i - start)).indices).tolist())
            assert set(slots.index[i, :4][slots.valid[i, :4]].tolist()) == expected
        edge_index, sim = slots.edges()
        torch.testing.assert_close(sim, (uk[edge_index[0]] * uq[edge_index[1]]).sum(-1))
    with pytest.raises(ValueError, match="causal"):
        DynamicMesh(4, causal=False).slots(keys, batch, query_x=queries)
