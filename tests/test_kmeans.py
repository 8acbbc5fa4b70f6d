import pytest
import torch

from quantnoise.functional import nearest_centroid
from quantnoise.kmeans import kmeans


def test_seeded_and_every_point_assigned_to_its_nearest_centroid():
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))
    c1, codes1 = kmeans(x, 32, niter=10, seed=7)
    c2, codes2 = kmeans(x, 32, niter=10, seed=7)
    assert torch.equal(c1, c2) and torch.equal(codes1, codes2)
    assert c1.shape == (32, 8) and codes1.shape == (4000,)
    d = torch.cdist(x, c1)
    assert torch.allclose(d.gather(1, codes1[:, None]).squeeze(1), d.min(1).values, atol=1e-4)
    assert codes1.unique().numel() == 32  # no empty cluster
    c3, _ = kmeans(x, 32, niter=10, seed=8)
    assert not torch.equal(c1, c3)


def test_better_than_random_codebook():
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1))
    c, codes = kmeans(x, 64, niter=20, seed=0)
    mse = (x - c[codes]).pow(2).mean()
    rand_c = x[:64]
    mse_rand = (x - rand_c[nearest_centroid(x, rand_c)]).pow(2).mean()
    assert mse < 0.9 * mse_rand


def test_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((100, 4), float("nan")), 4, name="layer 'fc1'")
    with pytest.raises(ValueError, match="n_centroids <= 10"):
        kmeans(torch.randn(10, 4), 16)
