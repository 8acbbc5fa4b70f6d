"""Q-BERT Hessian sensitivity: power iteration against the exact dense Hessian of a tiny MLP."""
import logging

import pytest
import torch
from torch import nn

from quantnoise.compress.sensitivity import SensitivityScore, format_table, hessian_sensitivity, top_eigenvalue


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()  # 24 + 18 weights


def data(n_batches=3):
    g = torch.Generator().manual_seed(2)  # layer 0's |lambda_2| / |lambda_1| <= 0.56: power iteration converges
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n_batches)]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def dense_top_eig(model, layer: int, batch) -> float:
    """Dominant eigenvalue of the exact Hessian of the loss w.r.t. layer ``layer``'s weight (checked
    to be well separated from the next one of another value, so that power iteration converges)."""
    w0 = model[layer].weight.detach()

    def loss_of(w):
        h = batch[0]
        for j, mod in enumerate(model):
            h = nn.functional.linear(h, w, mod.bias) if j == layer else mod(h)
        return ((h - batch[1]) ** 2).mean()

    h = torch.autograd.functional.hessian(loss_of, w0).reshape(w0.numel(), w0.numel())
    ev = torch.linalg.eigvalsh(h.double())
    mags = ev.abs().sort(descending=True).values
    other = mags[(mags - mags[0]).abs() > 1e-6 * mags[0]]  # a repeated top eigenvalue is fine
    assert other.numel() == 0 or other[0] < 0.9 * mags[0], "test data gives no eigen-gap: pick another seed"
    return float(ev[ev.abs().argmax()])


def test_power_iteration_matches_dense_hessian():
    model, batches = mlp(), data()
    scores = hessian_sensitivity(model, mse, batches, iters=300, tol=1e-9, seed=0)
    assert list(scores) == ["0", "2"]
    for name in scores:
        exact = [dense_top_eig(model, int(name), b) for b in batches]
        assert scores[name].eigs == pytest.approx(exact, rel=1e-4)
        mags = torch.tensor(exact).abs()
        assert scores[name].score == pytest.approx(float(mags.mean() + mags.std(unbiased=False)), rel=1e-4)
        assert scores[name].numel == model[int(name)].weight.numel()


def test_same_seed_same_scores_and_model_untouched():
    model, batches = mlp(), data(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].weight.requires_grad_(False)
    a = hessian_sensitivity(model, mse, batches, iters=5, tol=0, seed=3)
    b = hessian_sensitivity(model, mse, batches, iters=5, tol=0, seed=3)
    c = hessian_sensitivity(model, mse, batches, iters=5, tol=0, seed=4)
    assert a == b
    assert a["0"].eigs != c["0"].eigs  # 5 products from another start: not converged to the same digits
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].weight.requires_grad is False and model[0].weight.grad is None
    # a layer's scores do not depend on which other layers are scored
    assert hessian_sensitivity(model, mse, batches, layers=["2"], iters=5, tol=0, seed=3)["2"] == a["2"]


def test_layer_selection_embedding_and_regex(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    batches = [(torch.tensor([[1, 2, 3], [3, 4, 5]]), torch.tensor([0, 1]))]
    ce = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    with caplog.at_level(logging.INFO, logger="quantnoise.compress.sensitivity"):
        s = hessian_sensitivity(model, ce, batches, iters=50)
    assert list(s) == ["0", "2"] and s["0"].score > 0 and s["2"].score > 0
    assert "batch 1 done" in caplog.text
    assert list(hessian_sensitivity(model, ce, batches, layers=r"^2$", iters=3)) == ["2"]
    table = format_table(s, {"0": 8, "2": 4})
    assert table.splitlines()[0].split()[:5] == ["layer", "weights", "mean", "std", "score"]
    assert len(table.splitlines()) == 3


def test_top_eigenvalue_of_known_matrix():
    a = torch.diag(torch.tensor([3.0, -5.0, 1.0]))
    eig, k = top_eigenvalue(lambda v: a @ v, torch.ones(3), iters=500, tol=1e-12)
    assert eig == pytest.approx(-5.0, rel=1e-6) and k < 500
    assert top_eigenvalue(lambda v: torch.zeros(3), torch.ones(3)) == (0.0, 1)
    assert SensitivityScore("x", 3, (2.0, -4.0)).score == pytest.approx(3.0 + 1.0)


@pytest.mark.parametrize("case, message", [
    ("no_batches", "batches is empty"),
    ("unused_layer", "does not depend on layer 'extra'"),
    ("no_linear", "has no Linear or Embedding layer"),
    ("nan_loss", "the loss of batch 0 is nan"),
    ("bad_name", "layer 'nope' is not a module"),
    ("bad_iters", "iters=0 is invalid"),
    ("bad_regex", "layers='\\(' is not a regular expression"),
])
def test_bad_input_one_line_error(case, message):
    model, batches, layers, iters = mlp(), data(1), None, 5
    loss = mse
    if case == "no_batches":
        batches = []
    elif case == "unused_layer":
        model = nn.ModuleDict({"net": model, "extra": nn.Linear(2, 2)})
        loss = lambda m, b: mse(m["net"], b)  # noqa: E731
    elif case == "no_linear":
        model = nn.Sequential(nn.Tanh())
    elif case == "nan_loss":
        loss = lambda m, b: mse(m, b) * float("nan")  # noqa: E731
    elif case == "bad_name":
        layers = ["nope"]
    elif case == "bad_regex":
        layers = "("
    else:
        iters = 0
    with pytest.raises(ValueError, match=message) as e:
        hessian_sensitivity(model, loss, batches, layers=layers, iters=iters)
    assert "\n" not in str(e.value)
