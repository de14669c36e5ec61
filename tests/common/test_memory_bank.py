import pytest
import torch

from common.memory_bank import MemoryBank, greedy_coreset, nearest_neighbors


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_query_equal_to_bank_gives_zero_distance(metric, backend):
    bank = torch.randn(50, 16)
    dist, idx = nearest_neighbors(bank, bank, k=1, metric=metric, backend=backend)
    assert torch.allclose(dist[:, 0], torch.zeros(50), atol=1e-3)
    assert torch.equal(idx[:, 0], torch.arange(50))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_matches_brute_force_and_chunking_changes_nothing(metric):
    g = torch.Generator().manual_seed(0)
    query, bank = torch.randn(301, 8, generator=g), torch.randn(97, 8, generator=g)
    if metric == "cosine":
        full = 1 - torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    else:
        full = torch.cdist(query, bank)
    ref_dist, ref_idx = full.topk(3, dim=1, largest=False)
    for chunk in (7, 64, 10_000):
        dist, idx = nearest_neighbors(query, bank, k=3, metric=metric, chunk_size=chunk)
        assert torch.allclose(dist, ref_dist, atol=1e-4)
        assert torch.equal(idx, ref_idx)
    dist_f, idx_f = nearest_neighbors(query, bank, k=3, metric=metric, backend="faiss")
    assert torch.allclose(dist_f, ref_dist, atol=1e-4)
    assert torch.equal(idx_f, ref_idx)


def test_l2_distance_is_never_nan_for_identical_vectors():
    v = torch.full((4, 32), 1e3)
    dist, _ = nearest_neighbors(v, v, metric="l2")
    assert torch.isfinite(dist).all() and (dist >= 0).all()


def test_memory_bank_is_a_buffer_in_state_dict():
    bank = MemoryBank(metric="l2").fit(torch.randn(10, 4))
    assert "features" in bank.state_dict()
    assert bank.nbytes == 10 * 4 * 4
    restored = MemoryBank(metric="l2")
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.features, bank.features)
    with pytest.raises(RuntimeError):
        MemoryBank().search(torch.randn(2, 4))


def test_bad_arguments():
    with pytest.raises(ValueError):
        nearest_neighbors(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError):
        nearest_neighbors(torch.randn(3, 4), torch.randn(2, 4), k=3)
    with pytest.raises(ValueError):
        nearest_neighbors(torch.randn(3, 4), torch.randn(2, 4), metric="manhattan")


def test_auto_backend_matches_torch():
    g = torch.Generator().manual_seed(1)
    query, bank = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    d_auto, i_auto = nearest_neighbors(query, bank, k=2, metric="l2", backend="auto")
    d_torch, i_torch = nearest_neighbors(query, bank, k=2, metric="l2", backend="torch")
    assert torch.equal(i_auto, i_torch) and torch.allclose(d_auto, d_torch, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        nearest_neighbors(query, bank, backend="annoy")


def test_greedy_coreset_covers_the_bank_better_than_a_random_subset():
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(500, 200, generator=g), torch.full((1, 200), 50.0)])  # one far outlier
    idx = greedy_coreset(feats, 0.1, seed=1)
    assert idx.shape == (50,) and torch.equal(idx, idx.sort().values) and idx.unique().numel() == 50
    assert 500 in idx.tolist()  # k-center keeps the farthest point
    assert torch.equal(idx, greedy_coreset(feats, 0.1, seed=1))  # seeded
    covering = torch.cdist(feats, feats[idx]).min(1).values.max()
    random = torch.cdist(feats, feats[torch.randperm(501, generator=g)[:50]]).min(1).values.max()
    assert covering < random
    assert torch.equal(greedy_coreset(feats, 1.0), torch.arange(501))
    with pytest.raises(ValueError):
        greedy_coreset(feats, 0.0)


def test_memory_bank_fit_with_coreset_keeps_bank_rows():
    feats = torch.randn(400, 8)
    bank = MemoryBank(metric="l2").fit(feats, coreset_ratio=0.25)
    assert bank.features.shape == (100, 8)
    exact = torch.cdist(bank.features, feats, compute_mode="donot_use_mm_for_euclid_dist")
    assert (exact.min(1).values == 0).all()  # rows of the input, not new points
