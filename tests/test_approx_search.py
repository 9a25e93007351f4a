"""The tree search (random projection trees): recall against the exact search, its rule where it must be
exact, batch invariance, permutation equivariance, and DynamicMesh(search="tree")."""
import pytest
import torch
import torch.nn.functional as F

from tmt_pyg.layers.approx_search import tree_knn, tree_leaves
from tmt_pyg.layers.mesh import DynamicMesh, flat_knn
from tmt_pyg.layers.routed_search import neighbour_recall


def clustered(n: int, dim: int = 32, clusters: int = 60, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(clusters, dim, generator=g)[torch.randint(0, clusters, (n,), generator=g)] + noise * torch.randn(
        n, dim, generator=g)


def exact(x: torch.Tensor, batch: torch.Tensor, k: int):
    mesh = DynamicMesh(k, causal=False, backend="dense").slots(x, batch)
    return mesh.index[:, :k], mesh.valid[:, :k]


def test_leaves_are_balanced_parts_of_one_graph():
    batch = torch.tensor([0] * 1000 + [1] * 77 + [2] * 300)
    u = F.normalize(torch.randn(batch.numel(), 8), dim=-1)
    order, leaf = tree_leaves(u @ torch.randn(8, 40), batch, 64)
    assert torch.equal(order.sort().values, torch.arange(batch.numel())) and bool((leaf[1:] >= leaf[:-1]).all())
    sizes = torch.bincount(leaf)
    assert int(sizes.max()) <= 64 and int(sizes.min()) > 64 // 2  # halves at the median: balanced
    for part in range(sizes.numel()):
        assert batch[order[leaf == part]].unique().numel() == 1  # a leaf never mixes graphs


def test_one_leaf_per_graph_is_the_exact_search():
    """With leaves as large as the graphs every candidate is seen: the exact search's neighbours and tie rule."""
    batch = torch.tensor([0] * 90 + [1] * 40)
    x = torch.randn(130, 16)
    x[5] = x[7] = x[9]  # exact ties: the later node wins in both
    u = F.normalize(x, dim=-1)
    found, valid = tree_knn(u, batch, 6, trees=2, leaf_size=90)
    ptr = torch.tensor([0, 90, 130])
    index, want_valid = flat_knn(u, batch, ptr, 6, False, torch.arange(130))
    assert torch.equal(valid, want_valid) and bool(valid.all())
    assert torch.equal(found.sort(1).values, index.sort(1).values)


def test_recall_on_clustered_data():
    """Recall of the default trees on 3000 clustered nodes; candidates of a single small leaf per node
    (one tree of 32-node leaves) stay far below it, random candidates near 0."""
    x = clustered(3000)
    batch = torch.zeros(3000, dtype=torch.long)
    want, want_valid = exact(x, batch, 16)
    u = F.normalize(x, dim=-1)
    recall = neighbour_recall(*tree_knn(u, batch, 16, trees=4, leaf_size=256), want, want_valid)
    weak = neighbour_recall(*tree_knn(u, batch, 16, trees=1, leaf_size=32), want, want_valid)
    assert recall > 0.9 and weak < 0.5, (recall, weak)  # measured 0.97 and 0.25
    found, valid = tree_knn(u, batch, 16)
    assert bool(valid.all()) and not bool((found == torch.arange(3000).unsqueeze(1)).any())  # k others each, no self


def test_mesh_recall_method():
    """``DynamicMesh.recall`` on a sample of queries equals the recall of the whole table on those rows: 1 for
    the exact search and for graphs below ``exact_max_nodes``, the trees' recall above it; causal meshes refuse."""
    x = clustered(3000)
    batch = torch.zeros(3000, dtype=torch.long)
    want, want_valid = exact(x, batch, 16)
    tree = DynamicMesh(16, causal=False, search="tree", exact_max_nodes=1000, trees=1, leaf_size=64)
    slots = tree.slots(x)
    sample = torch.randperm(3000, generator=torch.Generator().manual_seed(3))[:500].sort().values
    expected = neighbour_recall(slots.index[sample, :16], slots.valid[sample, :16], want[sample], want_valid[sample])
    assert tree.recall(x, queries=500, seed=3) == pytest.approx(expected) and expected < 0.9
    assert DynamicMesh(16, causal=False).recall(x, queries=500) == 1.0
    assert DynamicMesh(16, causal=False, search="tree", exact_max_nodes=4096).recall(x, queries=500) == 1.0
    with pytest.raises(ValueError, match="bidirectional"):
        DynamicMesh(4, causal=True).recall(x)


def test_tree_search_is_batch_invariant_and_permutation_equivariant():
    mesh = DynamicMesh(5, causal=False, backend="dense", search="tree", exact_max_nodes=100, leaf_size=32)
    sizes = [400, 60, 250]
    xs = [clustered(n, 12, 10, seed=n) for n in sizes]
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    together = mesh.slots(torch.cat(xs), batch)
    start = 0
    for n, x in zip(sizes, xs):
        alone = mesh.slots(x)
        assert torch.equal(together.index[start:start + n] - start, alone.index)
        assert torch.equal(together.valid[start:start + n], alone.valid)
        start += n
    perm = torch.randperm(400)
    alone, permuted = mesh.slots(xs[0]), mesh.slots(xs[0][perm])  # node perm[i] becomes node i
    assert torch.equal(perm[permuted.index].sort(1).values, alone.index[perm].sort(1).values)


def test_small_graphs_stay_exact_and_errors():
    x, batch = torch.randn(200, 8), torch.tensor([0] * 120 + [1] * 80)
    tree = DynamicMesh(4, causal=False, backend="dense", search="tree", exact_max_nodes=120, leaf_size=16)
    assert torch.equal(tree.slots(x, batch).index, DynamicMesh(4, causal=False, backend="dense").slots(x, batch).index)
    assert str(tree) == "DynamicMesh(k=4, causal=False, backend='dense', search='tree', exact_max_nodes=120, trees=4, leaf_size=16)"
    with pytest.raises(ValueError, match="needs a bidirectional mesh"):
        DynamicMesh(4, search="tree", causal=True)
    with pytest.raises(ValueError, match="leaf_size \\(4\\) must exceed k \\(4\\)"):
        DynamicMesh(4, causal=False, search="tree", leaf_size=4)
    with pytest.raises(ValueError, match="trees must be an integer >= 1"):
        DynamicMesh(4, causal=False, search="tree", trees=0)


def test_size_error_before_allocating(monkeypatch):
    """A graph whose exact search blocks exceed the memory available: a MemoryError naming the estimate, the
    limit and the way out, raised before the search allocates; the tree search of the same graph fits."""
    import tmt_pyg.layers.mesh as mesh_module
    monkeypatch.setattr(mesh_module, "available_memory", lambda device: 8 * 2 ** 20)  # 8 MiB
    x = torch.randn(2000, 8)
    with pytest.raises(MemoryError, match=r"2,000-node graph .* about 0\.0114 GiB, more than the 0\.00781 GiB available "
                                          r"on cpu: use search='tree'"):
        DynamicMesh(4, causal=False, backend="dense").slots(x)
    assert DynamicMesh(4, causal=False, backend="dense", search="tree", exact_max_nodes=1000).slots(x).valid.all()


def test_available_memory_is_read():
    from tmt_pyg.layers.mesh import available_memory
    free = available_memory(torch.device("cpu"))
    assert free is not None and free > 2 ** 20  # /proc/meminfo on this Linux CPU
