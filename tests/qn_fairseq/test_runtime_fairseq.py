"""A .qnz of a real fairseq LM runs compressed (quantnoise.runtime.load_fairseq, fairseq-eval-lm --path m.qnz)
and computes what the decoded model computes."""
import re

import pytest
import torch
from torch import nn

from conftest import USER_DIR, run

EVAL = ["--tokens-per-sample", "32", "--max-tokens", "512", "--num-workers", "0"]
SCHEMES = {"pq": ["--scheme", "pq", "--centroids", "64"], "int8": ["--scheme", "scalar", "--bits", "8"],
           "int4": ["--scheme", "scalar", "--bits", "4"]}


@pytest.fixture(scope="module")
def qnz(tiny_lm_ckpt, tmp_path_factory):
    """{scheme: .qnz path} of the tiny trained LM."""
    from quantnoise.cli import main

    d, out = tmp_path_factory.mktemp("qnz"), {}
    for scheme, flags in SCHEMES.items():  # the real commands, in this process (no interpreter start-ups)
        assert main(["quantize", str(tiny_lm_ckpt), "-o", str(d / f"{scheme}.pt"), *flags]) == 0
        assert main(["export", str(d / f"{scheme}.pt"), "-o", str(d / f"{scheme}.qnz")]) == 0
        out[scheme] = d / f"{scheme}.qnz"
    return out


def stored_bytes(model) -> int:
    seen, total = set(), 0
    for m in model.modules():
        tensors = list(m.named_parameters(recurse=False)) + [(n, b) for n, b in m.named_buffers(recurse=False)
                                                             if n not in m._non_persistent_buffers_set]
        if getattr(m, "_packed", None) is not None:
            tensors.append(("qweight", m.int8_weight()))
        for _, t in tensors:
            key = (t.untyped_storage().data_ptr(), t.dtype) if t.numel() else id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_runtime_model_equals_decoded_model_and_stays_small(qnz, lm_data, scheme, monkeypatch):
    from quantnoise import export, runtime
    from quantnoise.runtime import load as runtime_load

    def no_decode(*a, **k):
        raise AssertionError("a compressed layer was decoded whole while loading")

    with monkeypatch.context() as mp:
        mp.setattr(export, "decode", no_decode)
        mp.setattr(runtime_load, "decode", no_decode)
        model, _, task = runtime.load_fairseq(qnz[scheme], data=lm_data)
    plain, _, _ = runtime.load_fairseq(qnz[scheme], data=lm_data, decoded=True)
    summary = runtime.runtime_summary(model)
    assert sum(summary.values()) == 14, summary  # 2 layers x 6 Linear, the embedding, the output projection
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert stored_bytes(model) <= 1.3 * qnz[scheme].stat().st_size, (stored_bytes(model), qnz[scheme].stat().st_size)
    assert stored_bytes(plain) > 2 * stored_bytes(model)

    toks = torch.randint(4, len(task.dictionary), (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(toks)[0], plain(toks)[0]
        if scheme == "int8":  # activations quantized on the fly: close, not equal
            assert (got - want).abs().max() < 0.02 * want.abs().max()
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
        else:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # incremental (generation) decoding through fairseq's incremental state equals the full forward
        state, steps = {}, []
        for t in range(toks.shape[1]):
            steps.append(model(toks[:, : t + 1], incremental_state=state)[0][:, -1])
        tol = 0.02 * got.abs().max().item() if scheme == "int8" else 1e-4
        torch.testing.assert_close(torch.stack(steps, 1), got, atol=tol, rtol=1e-4)


def perplexity(out) -> float:
    m = re.search(r"Perplexity: ([0-9.]+)", out.stderr + out.stdout)
    assert m, out.stderr[-2000:]
    return float(m.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["pq", "int8"])
def test_eval_lm_of_a_qnz_runs_compressed_with_the_decoded_perplexity(qnz, lm_data, scheme):
    cmd = ["fairseq-eval-lm", lm_data, "--path", qnz[scheme], "--user-dir", USER_DIR, *EVAL]
    compressed = run(cmd)
    assert "loaded" in compressed.stderr and "compressed" in compressed.stderr
    decoded = run(cmd, env={"QUANTNOISE_QNZ_DECODE": "1"})
    assert "compressed:" not in decoded.stderr
    a, b = perplexity(compressed), perplexity(decoded)
    assert abs(a - b) <= 1e-3 * b, (a, b)


def test_sinusoidal_positions_are_computed_only_as_far_as_the_inputs_reach(qnz, lm_data, monkeypatch):
    """The runtime does not build fairseq's full fp32 position table at load (max positions x dim); it grows
    the table as inputs need it, and the outputs equal the decoded (stock) model's: an input within the first
    table, one longer, one longer than the model's max positions, and incremental generation."""
    from quantnoise import runtime

    lazy = runtime.fairseq_plugin().LazySinusoidalPositionalEmbedding
    monkeypatch.setattr(lazy, "INITIAL_POSITIONS", 4)
    model, _, task = runtime.load_fairseq(qnz["pq"], data=lm_data)
    plain, _, _ = runtime.load_fairseq(qnz["pq"], data=lm_data, decoded=True)
    pos, stock = model.decoder.embed_positions, plain.decoder.embed_positions
    first = pos.padding_idx + 1 + 4
    assert type(pos) is lazy and pos.weights.shape[0] == first < stock.weights.shape[0] == pos.built_size
    toks = torch.randint(4, len(task.dictionary), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in (3, 24, 40):  # 40 > the tiny LM's 32 positions: fairseq's own forward regrows both tables
            torch.testing.assert_close(model(toks[:, :n])[0], plain(toks[:, :n])[0], atol=1e-4, rtol=1e-4)
            assert pos.weights.shape[0] <= stock.weights.shape[0]
            assert torch.equal(pos.weights, stock.weights[: pos.weights.shape[0]])
        want = plain(toks[:, :24])[0]
        pos.weights = pos.weights[:first].clone()
        state, steps, sizes = {}, [], set()
        for t in range(24):
            steps.append(model(toks[:, : t + 1], incremental_state=state)[0][:, -1])
            sizes.add(pos.weights.shape[0])
    torch.testing.assert_close(torch.stack(steps, 1), want, atol=1e-4, rtol=1e-4)
    assert len(sizes) <= 4, sorted(sizes)  # regrown by doubling (6, 12, 24, 34), not once per token


def test_learned_positions_compute_from_the_stored_codes():
    """A compressed fairseq LearnedPositionalEmbedding (RoBERTa's, a learned-position LM's) runs from its codes,
    with no decoded table, and equals fairseq's own module holding the decoded weight: padded input, and one
    step of incremental decoding."""
    from fairseq.modules import LearnedPositionalEmbedding
    from torch import nn

    from quantnoise import runtime

    Q = runtime.fairseq_plugin()
    g = torch.Generator().manual_seed(0)
    codes, cents = torch.randint(0, 16, (40 * 16 // 8,), generator=g).to(torch.uint8), torch.randn(16, 8, generator=g)
    stock = LearnedPositionalEmbedding(40, 16, padding_idx=1)
    with torch.device("meta"):
        model = nn.Module()
        model.pos = LearnedPositionalEmbedding(40, 16, padding_idx=1)
    meta = {"layers": {"pos": {"scheme": "pq", "shape": [40, 16], "block_size": 8, "n_centroids": 16,
                               "codes": "uint8", "centroids": "float16", "dtype": "float32"}}, "dense": {}, "aliases": {}}
    tensors = {"pos.codes": codes, "pos.centroids": cents.half()}
    stock.weight.data = cents.half().float()[codes.long()].reshape(40, 16)  # what the file stores
    Q.RuntimeLearnedPositions.from_meta_(model.pos, meta, "pos", tensors)
    runtime.fill_model_(model, tensors, meta)
    assert type(model.pos) is Q.RuntimeLearnedPositions and type(model.pos.rows) is runtime.CodesEmbedding
    assert not list(model.parameters()) and model.pos.max_positions == stock.max_positions == 38
    ids = torch.randint(4, 30, (2, 12), generator=g)
    ids[1, :3] = 1  # left padding: padded positions look up row padding_idx
    with torch.no_grad():
        torch.testing.assert_close(model.pos(ids), stock(ids), atol=0, rtol=0)
        torch.testing.assert_close(model.pos(ids, incremental_state={}), stock(ids, incremental_state={}), atol=0, rtol=0)


def test_meta_cpu_patch_is_thread_safe():
    """Two loads in two threads: the one still building keeps meta.cpu() on meta after the other finishes,
    a thread outside keeps torch's behaviour, and torch.Tensor.cpu is torch's own again at the end."""
    import threading

    from quantnoise.runtime import fairseq_plugin

    stays = fairseq_plugin()._meta_stays_meta
    original, meta = torch.Tensor.cpu, torch.empty(3, device="meta")
    a_in, a_out, seen = threading.Event(), threading.Event(), {}

    def a():
        with stays():
            a_in.set()
        a_out.set()

    def b():
        with stays():
            a_in.wait()
            a_out.wait()  # a has left: b's context must still hold
            seen["b"] = meta.cpu().is_meta
            outside = threading.Thread(target=lambda: seen.__setitem__("outside", _cpu_or_error(meta)))
            outside.start()
            outside.join()

    threads = [threading.Thread(target=f) for f in (b, a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"b": True, "outside": "error"}
    assert torch.Tensor.cpu is original


def _cpu_or_error(t):
    try:
        t.cpu()
    except (NotImplementedError, RuntimeError):
        return "error"
    return "meta"


def _resigned(path, out, change):
    from quantnoise import export
    import json, zlib
    from safetensors.torch import save

    tensors, meta = export.read_qnz(path)
    change(tensors, meta)
    meta["crc32"] = {k: export._crc(t) for k, t in tensors.items()}
    text = json.dumps(meta)
    out.write_bytes(save(tensors, metadata={"qnz": text, "qnz_crc32": str(zlib.crc32(text.encode()))}))
    return out


def _rename_layer(t, m):
    name = "decoder.layers.0.fc1"
    m["layers"]["decoder.layers.0.nothere"] = m["layers"].pop(name)
    for part in ("codes", "centroids"):
        t[f"decoder.layers.0.nothere.{part}"] = t.pop(f"{name}.{part}")


def _junk(t, m):
    t["decoder.junk"] = torch.zeros(3, dtype=torch.float16)
    m["dense"]["decoder.junk"] = {"dtype": "float32"}


CRAFTED = {  # what each gave before: AttributeError / ValidationError tracebacks, a new parameter
    "layer_missing": (_rename_layer, "compresses layer 'decoder.layers.0.nothere', which is no layer"),
    "alias_missing": (lambda t, m: m["aliases"].update({"decoder.nothere.weight": "decoder.embed_tokens"}),
                      "ties 'decoder.nothere.weight', which is no parameter or buffer"),
    "dense_junk": (_junk, "stores tensor 'decoder.junk', which is no parameter or buffer"),
    "bad_cfg": (lambda t, m: m["fairseq"]["cfg"]["model"].update(decoder_layers="many"),
                "its fairseq config does not build a model"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_maps_are_refused_in_one_line(qnz, lm_data, tmp_path, case):
    from quantnoise import runtime

    change, why = CRAFTED[case]
    path = _resigned(qnz["pq"], tmp_path / "m.qnz", change)
    with pytest.raises(SystemExit) as e:
        runtime.fairseq_plugin().load_model(path, data=lm_data)
    msg = str(e.value)
    assert msg.startswith("error: ") and str(path) in msg and why in msg and len(msg.splitlines()) == 1, msg


def test_a_bad_cfg_is_one_line_on_the_decoded_path_too(qnz, lm_data, tmp_path):
    """QUANTNOISE_QNZ_DECODE / --restore-file decode the .qnz through qn_fairseq/ipq.py's loader: a config
    omegaconf rejects was a ValidationError traceback there."""
    from quantnoise import runtime

    path = _resigned(qnz["pq"], tmp_path / "m.qnz", CRAFTED["bad_cfg"][0])
    with pytest.raises(SystemExit) as e:
        runtime.fairseq_plugin().load_model(path, data=lm_data, decoded=True)
    msg = str(e.value)
    assert msg.startswith("error: ") and "fairseq config" in msg and len(msg.splitlines()) == 1, msg


def test_lean_incremental_step_equals_fairseqs_and_keeps_its_cache(qnz, lm_data, monkeypatch):
    """Generation through the runtime's lean step (decoder layers without fairseq's no-op branches, attention
    appending to fairseq's key / value cache) computes what fairseq's own forwards compute from the same model,
    and leaves the cache in fairseq's layout: a beam reorder, fairseq's own path continuing a lean state, and a
    left-padded batch (a padding mask: fairseq's path, for every later step too)."""
    from fairseq.modules import MultiheadAttention

    from quantnoise import runtime

    plugin = runtime.fairseq_plugin()
    model, _, task = runtime.load_fairseq(qnz["pq"], data=lm_data)
    routed = type(model.decoder.layers[0].self_attn)
    assert routed.__name__ == "RoutedMultiheadAttention"
    assert all(isinstance(layer, plugin.LeanDecoderStep) for layer in model.decoder.layers)
    lean_steps = []
    step = routed._sdpa_step
    monkeypatch.setattr(routed, "_sdpa_step", lambda self, *a: lean_steps.append(1) or step(self, *a))
    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, (plugin.LeanDecoderStep, routed))]

    def fairseq_path(on: bool) -> None:  # the same modules as fairseq's own classes (its forwards), or back
        for m, cls in swapped:
            m.__class__ = (MultiheadAttention if cls is routed else cls.__bases__[1]) if on else cls

    def decode(toks, state, t0, t1, fairseq=False):
        fairseq_path(fairseq)
        try:
            return torch.stack([model(toks[:, : t + 1], incremental_state=state)[0][:, -1] for t in range(t0, t1)], 1)
        finally:
            fairseq_path(False)

    toks = torch.randint(4, len(task.dictionary), (3, 12), generator=torch.Generator().manual_seed(1))
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        lean, stock = {}, {}
        a, b = decode(toks, lean, 0, 7), decode(toks, stock, 0, 7, fairseq=True)
        assert len(lean_steps) == 7 * len(model.decoder.layers)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for state in (lean, stock):
            model.decoder.reorder_incremental_state_scripting(state, order)
        mixed = {k: dict(v) for k, v in lean.items()}
        a, b = decode(toks[order], lean, 7, 12), decode(toks[order], stock, 7, 12, fairseq=True)
        c = decode(toks[order], mixed, 7, 12, fairseq=True)  # fairseq's forward reads the lean cache
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, b, atol=1e-5, rtol=1e-5)
        padded = toks.clone()
        padded[1, :3] = task.dictionary.pad()
        lean_steps.clear()
        a, b = decode(padded, {}, 0, 12), decode(padded, {}, 0, 12, fairseq=True)
        assert not a[[0, 2]].isnan().any()  # (the padded row attends to nothing at step 0: NaN, in fairseq's too)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert not lean_steps  # a padding mask from the first step on: fairseq's path throughout
    import pickle

    layer = model.decoder.layers[0]
    assert type(pickle.loads(pickle.dumps(layer))) is type(layer)  # a module-level class (fairseq's --ema deep-copies)


def test_lean_step_is_mixed_only_into_decoder_layers_that_keep_fairseqs_forward():
    """Issue 33 item 14: every TransformerDecoderLayerBase subclass got the lean step, also fairseq's
    AugTransformerDecoderLayerBase, whose forward takes two more arguments (they shifted: AssertionError)."""
    import copy

    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
    from fairseq.modules.transformer_layer_aug import AugTransformerDecoderLayerBase

    from quantnoise import runtime

    plugin = runtime.fairseq_plugin()
    cfg = TransformerConfig()
    cfg.encoder.embed_dim = cfg.decoder.embed_dim = 16
    cfg.decoder.ffn_embed_dim, cfg.decoder.attention_heads = 32, 2
    torch.manual_seed(0)
    aug = AugTransformerDecoderLayerBase(cfg).eval()
    plain = TransformerDecoderLayerBase(cfg, no_encoder_attn=True).eval()
    stock = copy.deepcopy(aug)
    model = plugin.use_lean_step(nn.ModuleList([aug, plain]))
    assert type(model[0]) is AugTransformerDecoderLayerBase and isinstance(model[1], plugin.LeanDecoderStep)
    x, enc, enc_aug = torch.randn(1, 2, 16), torch.randn(3, 2, 16), torch.randn(4, 2, 16)
    with torch.no_grad():  # one incremental step, called as fairseq's AugTransformerDecoder calls its layers
        got = model[0](x, enc, None, enc_aug, None, {})
        want = stock(x, enc, None, enc_aug, None, {})
    assert torch.equal(got[0], want[0])
