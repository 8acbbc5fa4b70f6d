"""quantnoise.mixed: quantize_ with a bit plan (per-layer widths, group-wise scales, QAT or Quant-Noise), the
plan formats it reads, its one-line errors, and a QAT fine-tune of a transformers BERT exported at the plan's
widths."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantnoise import LayerBits, MixedPrecisionConfig, compress_, load_bit_plan, quantize_, save_qnz, wrapped_layers
from quantnoise.compress.bitplan import allocate_bits
from quantnoise.compress.layers import scalar_decode, scalar_quantize
from quantnoise.export import read_qnz


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))


PLAN = {"0": {"bits": 3, "rows_per_scale": 8}, "2": 2, "4": {"bits": 6, "p": 0.5}}


def test_each_layer_gets_its_planned_width_groups_and_p():
    m = mlp()
    names = quantize_(m, MixedPrecisionConfig.from_plan(PLAN))
    assert names == ["0", "2", "4"] and wrapped_layers(m) == ["0", "2", "4"]
    got = {n: (m.get_submodule(n).qn_cfg.bits, m.get_submodule(n).qn_cfg.rows_per_scale, m.get_submodule(n).qn_cfg.p)
           for n in names}
    assert got == {"0": (3, 8, 1.0), "2": (2, 1, 1.0), "4": (6, 1, 0.5)}
    assert all(m.get_submodule(n).qn_cfg.scheme == "scalar" and m.get_submodule(n).qn_cfg.eval_quantized for n in names)


@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_qat_forward_is_the_group_wise_quantized_layer_and_compress_stores_it(clip):
    """p=1: the training and eval forwards compute with exactly scalar_quantize's weights (one scale per group of
    rows_per_scale rows); compress_ with cfg.to_ipq_plan() then gives the same layer, int at its width."""
    m = mlp()
    cfg = MixedPrecisionConfig.from_plan(PLAN, clip=clip)
    quantize_(m, cfg)
    assert all(m.get_submodule(n).qn_cfg.clip == clip for n in ("0", "2", "4"))
    x = torch.randn(7, 16)
    for mode in (True, False):
        m.train(mode)
        q, scale = scalar_quantize(m[0].weight, 3, rows_per_scale=8, clip=clip)
        assert scale.shape == (4, 1)  # 32 rows, one scale per 8
        want = F.linear(x, scalar_decode(q, scale, (32, 16)), m[0].bias)
        torch.testing.assert_close(m[0](x), want, atol=0, rtol=0)
    m.eval()
    y = m(x)
    compress_(m, cfg.to_ipq_plan())
    assert [type(m[i]).__name__ for i in (0, 2, 4)] == ["ScalarLinear"] * 3
    assert [int(m[i].state_dict()["qbits"]) for i in (0, 2, 4)] == [3, 2, 6]
    torch.testing.assert_close(m(x), y, atol=0, rtol=0)  # the exported model is the QAT model in eval


def test_quant_noise_p_below_one_noises_some_weights_and_passes_gradients():
    m = mlp()
    quantize_(m, MixedPrecisionConfig.from_plan({"2": 2}, p=0.5, seed=3))
    m.train()
    with torch.no_grad():
        w = m[2].noisy(m[2].weight, 0.5)
    changed = (w != m[2].weight).float().mean()
    assert 0.2 < changed < 0.8  # about half the weights (block_size 1) are on the 2-bit grid, the rest exact
    m(torch.randn(4, 16)).sum().backward()
    assert m[2].weight.grad is not None and m[2].weight.grad.abs().sum() > 0


def test_plan_sources_agree(tmp_path):
    """A BitPlan, its stage YAML (quantnoise sensitivity -o), a JSON mapping and a dict give the same layers."""
    sizes = {"0": 512, "2": 768, "4": 120}
    plan = allocate_bits({"0": 5.0, "2": 0.1, "4": 1.0}, sizes, bits=(2, 3, 4, 8), avg_bits=3)
    plan.save_yaml(tmp_path / "plan.yaml", rows_per_scale={"0": 8})
    (tmp_path / "plan.json").write_text(json.dumps({"layers": {n: {"bits": b, "rows_per_scale": 8 if n == "0" else 1}
                                                               for n, b in plan.bits.items()}}))
    want = {n: LayerBits(bits=b, rows_per_scale=8 if n == "0" else 1) for n, b in plan.bits.items()}
    assert load_bit_plan(tmp_path / "plan.yaml") == want == load_bit_plan(str(tmp_path / "plan.json"))
    assert load_bit_plan(plan) == {n: LayerBits(bits=b) for n, b in plan.bits.items()}
    assert load_bit_plan({"encoder.layer.0.attention.self.query": 3}) == {"encoder.layer.0.attention.self.query": LayerBits(3)}
    assert MixedPrecisionConfig(layers={"0": 3, "2": {"bits": 4}}).layers == {"0": LayerBits(3), "2": LayerBits(4)}
    # dotted names survive the stage form's escaped patterns
    from quantnoise.compress.bitplan import BitPlan

    dotted = BitPlan(bits={"a.b-c.0": 3}, sizes={"a.b-c.0": 8}, budget_bits=24, used_bits=24, objective=0.0)
    dotted.save_yaml(tmp_path / "d.yaml")
    assert load_bit_plan(tmp_path / "d.yaml") == {"a.b-c.0": LayerBits(3)}


BAD = {  # plan, words of the one-line error
    "width 9": ({"0": 9}, "layer '0': bits=9 is invalid: use an integer from 2 to 8"),
    "width 1": ({"0": {"bits": 1}}, "bits=1 is invalid"),
    "width string": ({"0": "3"}, "bits='3' is invalid"),
    "unknown key": ({"0": {"bits": 3, "group": 2}}, "unknown keys ['group']"),
    "p 0": ({"0": {"bits": 3, "p": 0}}, "p=0 is invalid"),
    "empty": ({}, "names no layer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_plans_are_one_line(case):
    plan, words = BAD[case]
    with pytest.raises(ValueError) as e:
        MixedPrecisionConfig.from_plan(plan)
    assert words in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_plan_for_another_model_or_unfit_layer_is_one_line(tmp_path):
    m = mlp()
    with pytest.raises(ValueError, match=r"bit plan names 1 layer\(s\) that Sequential lacks \(decoder.fc1; its layers: 0, 2, 4\)"):
        quantize_(m, MixedPrecisionConfig.from_plan({"0": 3, "decoder.fc1": 4}))
    assert not wrapped_layers(m)  # nothing wrapped
    with pytest.raises(ValueError, match="rows_per_scale=5 does not divide its 32 output rows"):
        quantize_(m, MixedPrecisionConfig.from_plan({"2": 4, "0": {"bits": 3, "rows_per_scale": 5}}))
    assert not wrapped_layers(m)  # nothing wrapped: every wrapper is built before the first swap
    with pytest.raises(ValueError, match="layer '1' is a ReLU, which no quant-noise wrapper supports"):
        quantize_(m, MixedPrecisionConfig.from_plan({"1": 3}))
    (tmp_path / "re.yaml").write_text("stages:\n  - {pattern: 'fc[12]', scheme: scalar, bits: 3}\n")
    with pytest.raises(ValueError, match="pattern 'fc\\[12\\]' is not one exact layer name"):
        load_bit_plan(tmp_path / "re.yaml")
    with pytest.raises(OSError, match="does not exist"):
        load_bit_plan(tmp_path / "none.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="does not parse"):
        load_bit_plan(tmp_path / "bad.json")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_bert_qat_with_a_plan_exports_each_layer_at_its_width(tmp_path, clip):
    """A transformers BERT fine-tuned with the plan's quantizers in place (QAT, one scale per attention head on
    q/k/v), then compressed and saved: the .qnz stores every layer at its planned width (bit-packed: int3 in 3
    bits), and decodes to the QAT model's own quantized weights."""
    model = tiny_bert()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")]
    widths = [2, 3, 4, 8]
    plan = {n: {"bits": widths[i % 4], "rows_per_scale": 8 if n.endswith(("query", "key", "value")) else 1}
            for i, n in enumerate(names)}
    cfg = MixedPrecisionConfig.from_plan(plan, clip=clip)
    assert quantize_(model, cfg) == names
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 60, (8, 12), generator=g), torch.randint(0, 3, (8,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert not torch.equal(before, model.bert.encoder.layer[0].attention.self.query.weight)  # STE: weights train
    model.eval()
    with torch.no_grad():
        qat = {n: model.get_submodule(n).noisy(model.get_submodule(n).weight, 1.0) for n in names}
        logits = model(input_ids=ids).logits
    compress_(model, cfg.to_ipq_plan())
    meta = save_qnz(model, tmp_path / "bert.qnz")
    tensors, meta = read_qnz(tmp_path / "bert.qnz")
    for n in names:
        e, spec = meta["layers"][n], cfg.layers[n]
        assert (e["bits"], e["pack_width"], e.get("rows_per_scale", 1)) == (spec.bits, spec.bits, spec.rows_per_scale)
        assert tensors[f"{n}.qweight"].numel() == math.ceil(math.prod(e["shape"]) * spec.bits / 8)
    from quantnoise.export import decode

    state = decode(tensors, meta)
    for n in names:
        torch.testing.assert_close(state[f"{n}.weight"], qat[n], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("clip,rps", [("minmax", 4), ("mse", 4), ("mse", 1)])
def test_embedding_groups_use_the_whole_table_and_match_the_compressed_rows(clip, rps):
    """An Embedding's group-wise scales come from whole groups of the table, whichever rows a batch looks up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 8))
    cfg = MixedPrecisionConfig.from_plan({"0": {"bits": 3, "rows_per_scale": rps, "clip": clip}})
    quantize_(model, cfg)
    q, scale = scalar_quantize(model[0].weight, 3, rows_per_scale=rps, clip=clip)
    table = scalar_decode(q, scale, (40, 8))
    ids = torch.tensor([[3, 17, 3], [39, 0, 22]])
    for mode in (True, False):
        model.train(mode)
        torch.testing.assert_close(model(ids), table[ids], atol=0, rtol=0)
    compress_(model, cfg.to_ipq_plan())
    torch.testing.assert_close(model(ids), table[ids], atol=0, rtol=0)


def test_gpt2_plan_qat_with_trainer_exports_conv1d_at_its_width(tmp_path):
    """GPT-2 (Conv1D layers, weights stored (in, out)) fine-tuned by a real transformers.Trainer with the plan's
    quantizers (QuantNoiseCallback keeping the masks' step), then compressed: the .qnz holds c_attn at 3 bits with
    one scale per 8 output features, decoding to the QAT model's own weights."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from quantnoise.hf import QuantNoiseCallback

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    plan = {"transformer.h.0.attn.c_attn": {"bits": 3, "rows_per_scale": 8}, "transformer.h.0.mlp.c_fc": 5,
            "transformer.h.0.mlp.c_proj": {"bits": 2, "p": 0.5}}
    cfg = MixedPrecisionConfig.from_plan(plan)
    assert quantize_(model, cfg) == list(plan)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 12), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = tf.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                learning_rate=1e-3, save_strategy="no", report_to=[], logging_steps=100, seed=0,
                                use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[QuantNoiseCallback()]).train()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)
    model.eval()
    qat = {n: model.get_submodule(n).noisy(model.get_submodule(n)._blocked_weight(), 1.0).detach().t() for n in plan}
    compress_(model, cfg.to_ipq_plan())
    save_qnz(model, tmp_path / "gpt2.qnz")
    tensors, meta = read_qnz(tmp_path / "gpt2.qnz")
    from quantnoise.export import decode

    state = decode(tensors, meta)
    for n, spec in cfg.layers.items():
        e = meta["layers"][n]
        assert (e["bits"], e["pack_width"], e.get("rows_per_scale", 1)) == (spec.bits, spec.bits, spec.rows_per_scale)
        w = state[f"{n}.weight"]
        w = w if w.shape == qat[n].shape else w.t()  # a Conv1D's entry may be stored as the Linear of W.T
        torch.testing.assert_close(w, qat[n], atol=0, rtol=0)


def test_clip_in_a_plan_file_reaches_the_layers_and_the_ipq_plan(tmp_path):
    """clip: per layer in a plan mapping or a stage YAML (BitPlan.save_yaml(clip=...)); the config's clip for the rest."""
    plan = allocate_bits({"0": 1.0, "2": 2.0}, {"0": 512, "2": 768}, bits=(2, 4), avg_bits=3.0)
    plan.save_yaml(tmp_path / "p.yaml", clip="mse")
    assert "clip: mse" in (tmp_path / "p.yaml").read_text()
    layers = load_bit_plan(tmp_path / "p.yaml")
    assert {s.clip for s in layers.values()} == {"mse"}
    cfg = MixedPrecisionConfig.from_plan({"0": {"bits": 2, "clip": "mse"}, "2": 3})
    assert [cfg.layer_config(n).clip for n in ("0", "2")] == ["mse", "minmax"]
    assert [r.clip for r in cfg.to_ipq_plan().stages] == ["mse", "minmax"]
    with pytest.raises(ValueError, match="clip='l1' is invalid"):
        MixedPrecisionConfig.from_plan({"0": {"bits": 2, "clip": "l1"}})
