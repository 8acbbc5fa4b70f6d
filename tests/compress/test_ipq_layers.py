"""Compressed layers in situations real models create (issue 13): subclasses with their own forward
(fairseq's positional embeddings), the all-zero padding row, and weights shared by two layers."""
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from quantnoise import QuantNoiseConfig, quantize_
from quantnoise.compress import layers as ipq
from quantnoise.compress.plan import IPQPlan, quantize_state_dict


class Positions(nn.Embedding):
    """Like fairseq's LearnedPositionalEmbedding: its own forward (looks up positions, not ids) and
    its own attribute."""

    def __init__(self, n, dim, padding_idx):
        super().__init__(n, dim, padding_idx)
        self.max_positions = n - padding_idx - 1

    def forward(self, ids):
        positions = torch.cumsum(ids.ne(self.padding_idx), 1) * ids.ne(self.padding_idx) + self.padding_idx
        return F.embedding(positions, self.weight, self.padding_idx)


def test_a_subclass_with_its_own_forward_keeps_it_when_compressed():
    torch.manual_seed(0)
    plain = Positions(20, 8, padding_idx=1)
    ids = torch.tensor([[1, 7, 7, 9, 3]])
    for rule in (ipq.LayerRule(block_size=4, n_centroids=8), ipq.LayerRule(scheme="scalar", bits=8)):
        layer = ipq.compress_module(plain, rule, "embed_positions")
        assert isinstance(layer, Positions) and isinstance(layer, ipq.CompressedMixin)
        assert layer.max_positions == 18 and type(layer).__name__ == f"{'PQ' if rule.scheme == 'pq' else 'Scalar'}Positions"
        expected = F.embedding(torch.tensor([[1, 2, 3, 4, 5]]), layer.weight, 1)  # positions, not ids
        assert torch.equal(layer(ids), expected)
        # a fresh model adopts the same class from the state alone
        holder = nn.Sequential(Positions(20, 8, padding_idx=1))
        state = {f"0.{k}": v for k, v in layer.state_dict().items()}
        assert ipq.adopt_state_structure_(holder, state) == ["0"]
        holder.load_state_dict(state)
        assert type(holder[0]) is type(layer) and holder[0].max_positions == 18
        assert torch.equal(holder[0](ids), expected)
        copy = pickle.loads(pickle.dumps(layer))  # the generated class is importable by its name
        assert type(copy) is type(layer) and torch.equal(copy(ids), expected)


def test_the_padding_row_stays_exactly_zero_under_pq_and_its_fine_tuning():
    torch.manual_seed(0)
    plain = nn.Embedding(40, 16, padding_idx=1)  # torch (and fairseq) zero the padding row
    layer = ipq.compress_module(plain, ipq.LayerRule(block_size=4, n_centroids=16), "embed_tokens")
    assert torch.equal(layer.weight[1], torch.zeros(16)) and layer.centroids.shape == (16, 4)
    assert not (layer.weight[torch.arange(40) != 1] == 0).all(1).any()  # only the padding row is zero
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        layer(torch.tensor([[1, 3, 5, 1, 7]])).pow(2).sum().backward()
        opt.step()
    assert torch.equal(layer.weight[1], torch.zeros(16))
    assert not torch.equal(layer.weight.detach(), before)  # the other rows did train
    # post-hoc quantization of a state dict gives the same zero row
    out, _ = quantize_state_dict({"e.weight": plain.weight.detach()}, IPQPlan([ipq.LayerRule(block_size=4, n_centroids=16)]))
    assert torch.equal(out["e.centroids"][out["e.codes"].long()].reshape(40, 16)[1], torch.zeros(16))


def test_pq_noise_leaves_the_padding_row_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 16, padding_idx=1))
    quantize_(model, QuantNoiseConfig(scheme="pq", p=0.5, block_size=4, n_centroids=8, eval_quantized=True))
    model.eval()  # eval_quantized: every block is replaced by its centroid
    out = model(torch.tensor([[1, 3, 5, 1, 7]]))
    assert torch.equal(out[0, 0], torch.zeros(16)) and torch.equal(out[0, 3], torch.zeros(16))
    assert not torch.equal(out[0, 1], model[0].weight[3].detach())  # the other rows are quantized


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 16, padding_idx=1)
        self.output_projection = nn.Linear(16, 32, bias=False)
        self.output_projection.weight = self.embed_tokens.weight

    def forward(self, ids):
        return self.output_projection(self.embed_tokens(ids))


def test_tied_layers_share_one_codebook_that_trains_tied():
    torch.manual_seed(0)
    model = TiedLM()
    groups = ipq.tied_layers(model)
    assert [[n for n, _ in g] for g in groups] == [["embed_tokens", "output_projection"]]
    new = ipq.compress_tied(groups[0], ipq.LayerRule(block_size=4, n_centroids=8), seed=0)
    for name, layer in new:
        ipq.set_submodule(model, name, layer)
    assert model.embed_tokens.centroids is model.output_projection.centroids
    assert model.embed_tokens.codes is model.output_projection.codes
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    assert len(opt.param_groups[0]["params"]) == 1
    before = model.embed_tokens.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(torch.tensor([[2, 5, 9]])).logsumexp(-1).sum().backward()
        opt.step()
    assert not torch.equal(model.embed_tokens.weight, before)
    assert torch.equal(model.embed_tokens.weight, model.output_projection.weight)


def test_loading_a_quantized_state_into_a_tied_model_keeps_it_tied():
    torch.manual_seed(0)
    trained = TiedLM()
    rule = ipq.LayerRule(block_size=4, n_centroids=8)
    posthoc, _ = quantize_state_dict(trained.state_dict(), IPQPlan([rule]))  # one codebook + a decoded copy
    assert "output_projection.weight" in posthoc and "output_projection.codes" not in posthoc
    staged = TiedLM()
    for name, layer in ipq.compress_tied(ipq.tied_layers(staged)[0], rule):
        ipq.set_submodule(staged, name, layer)
    for state in (dict(posthoc), staged.state_dict()):
        model = TiedLM()
        assert ipq.adopt_state_structure_(model, state) == ["embed_tokens", "output_projection"]
        model.load_state_dict(state)  # strict: the post-hoc decoded copy became the shared codebook's entries
        assert model.embed_tokens.centroids is model.output_projection.centroids
        assert torch.equal(model.output_projection.weight, model.embed_tokens.weight)


class Head(nn.Module):
    """Like fairseq's RobertaLMHead: a bare weight Parameter (tied to the embedding) read by F.linear, no
    Linear/Embedding/Conv, so no compressed class."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]))

    def forward(self, x):
        return F.linear(x, self.weight) + self.bias


class TiedMLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 16, padding_idx=1)
        self.lm_head = Head(self.embed_tokens.weight)

    def forward(self, ids):
        return self.lm_head(self.embed_tokens(ids))


def staged(rule):
    model = TiedMLM()
    for name, layer in ipq.compress_tied(ipq.tied_layers(model)[0], rule):  # what fairseq-train --ipq-plan does
        ipq.set_submodule(model, name, layer)
    return model


def test_a_tied_holder_with_no_compressed_class_reads_the_decoded_weight():
    from quantnoise import export

    torch.manual_seed(0)
    model = staged(ipq.LayerRule(block_size=4, n_centroids=8))
    head, emb = model.lm_head, model.embed_tokens
    assert isinstance(head, Head) and isinstance(head, ipq.TiedWeightView) and type(head).__name__ == "TiedHead"
    assert torch.equal(head.weight, emb.weight)
    assert [n for n, _ in model.named_parameters()] == ["embed_tokens.centroids", "lm_head.bias"]  # no fp32 copy
    model.lm_head(torch.randn(3, 16)).logsumexp(-1).sum().backward()  # the head alone
    assert emb.centroids.grad is not None and emb.centroids.grad.abs().sum() > 0  # reaches the shared centroids
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    assert torch.equal(head.weight, emb.weight)  # still tied after a step
    # the state dict: one codebook, the head's weight as the decoded tensor; a fresh model adopts and loads it
    state = model.state_dict()
    assert torch.equal(state["lm_head.weight"], emb.weight) and not [k for k in state if "lm_head.c" in k]
    fresh = TiedMLM()
    assert ipq.adopt_state_structure_(fresh, state) == ["embed_tokens"]
    fresh.load_state_dict(state)  # strict: the derived weight is dropped, not unexpected
    assert isinstance(fresh.lm_head, ipq.TiedWeightView) and torch.equal(fresh.lm_head.weight, emb.weight)
    ids = torch.tensor([[2, 5, 9]])
    assert torch.equal(fresh(ids), model(ids))
    assert len(list(fresh.parameters())) == 2
    # export stores the head's weight as an alias of the codebook, no dense copy
    _, meta = export.encode(state, {}, export.ExportOptions())
    assert meta["aliases"] == {"lm_head.weight": "embed_tokens"} and "lm_head.weight" not in meta["dense"]
    copy = pickle.loads(pickle.dumps(model))  # the generated class is importable; the head reads the copy's layer
    assert torch.equal(copy(ids), model(ids)) and copy.lm_head.qn_weight_of is copy.embed_tokens


def test_a_tied_holder_reads_an_int_weight_and_compress_says_so(caplog):
    from quantnoise import compress_

    torch.manual_seed(0)
    model = staged(ipq.LayerRule(scheme="scalar", bits=4))
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight) and len(list(model.parameters())) == 1
    model = TiedMLM()
    with caplog.at_level("WARNING", logger="quantnoise.api"):
        assert compress_(model, ipq.LayerRule(block_size=4, n_centroids=8)) == ["embed_tokens"]
    assert "reads the decoded weight it is tied to" in caplog.text
    assert isinstance(model.lm_head, ipq.TiedWeightView)
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    assert "weight: the decoded weight of the tied PQEmbedding" in repr(model.lm_head)
