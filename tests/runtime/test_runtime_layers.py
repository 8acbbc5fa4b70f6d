"""quantnoise.runtime: each compressed layer computes what the decoded fp32 layer computes."""
import sys

import pytest
import torch
from torch import nn

from quantnoise import runtime as R
from quantnoise.runtime import kernels as K
from quantnoise.export import ExportOptions, decode, encode, pack, unpack
from quantnoise.compress.layers import scalar_quantize


def pq_state(name, out, inn, bs=8, k=256, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    k = min(k, out * inn // bs)
    state = {f"{name}.codes": torch.randint(0, k, (out * inn // bs,), generator=g).to(torch.uint8 if k <= 256 else torch.int16),
             f"{name}.centroids": torch.randn(k, bs, generator=g),
             f"{name}.weight_size": torch.tensor([out, inn])}
    if bias:
        state[f"{name}.bias"] = torch.randn(out, generator=g)
    return state


def int_state(name, out, inn, bits, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    q, scale = scalar_quantize(torch.randn(out, inn, generator=g), bits)
    state = {f"{name}.qweight": q, f"{name}.qscale": scale, f"{name}.qbits": torch.tensor(bits),
             f"{name}.weight_size": torch.tensor([out, inn])}
    if bias:
        state[f"{name}.bias"] = torch.randn(out, generator=g)
    return state


def compressed(state):
    """(stored tensors, map, decoded fp32 state) of a state dict, through the .qnz encoder."""
    tensors, meta = encode(state, {}, ExportOptions(rest_dtype="float32"))
    return tensors, meta, decode(tensors, meta)


def runtime_linear(state, name="lin"):
    tensors, meta, ref = compressed(state)
    out, inn = meta["layers"][name]["shape"]
    like = nn.Linear(inn, out, bias=f"{name}.bias" in state, device="meta")
    model = nn.Module()
    model.add_module(name, like)
    R.fill_model_(model, tensors, meta)
    plain = nn.Linear(inn, out, bias=f"{name}.bias" in state)
    plain.load_state_dict({k[len(name) + 1:]: v for k, v in ref.items()})
    return getattr(model, name), plain


SHAPES = [(64, 32), (48, 64), (256, 128)]


@pytest.mark.parametrize("out,inn", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 40, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pq_linear_equals_decoded_layer(out, inn, tokens, dtype):
    layer, plain = runtime_linear(pq_state("lin", out, inn, k=64 if out * inn < 4096 else 256))
    x = torch.randn(2, tokens, inn).to(dtype)
    want = plain.to(dtype)(x)
    got = layer(x)
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_pq_linear_table_and_decode_paths_agree(tokens):
    layer, _ = runtime_linear(pq_state("lin", 96, 64, bs=4, k=32, seed=3))
    x = torch.randn(tokens, 64)
    layer.kernel = "lut"
    a = layer(x)
    layer.kernel = "decode"
    b = layer(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(a, torch.zeros_like(a))
    layer.kernel = "direct"  # compiled where built, else the table
    torch.testing.assert_close(layer(x), b, atol=1e-4, rtol=1e-4)


def test_pq_linear_int16_codes_and_int8_centroids():
    state = pq_state("lin", 64, 512, bs=4, k=1024, bias=False)
    tensors, meta = encode(state, {}, ExportOptions(rest_dtype="float32", centroids_dtype="int8"))
    ref = decode(tensors, meta)["lin.weight"]
    model = nn.Module()
    model.lin = nn.Linear(512, 64, bias=False, device="meta")
    R.fill_model_(model, tensors, meta)
    assert model.lin.codes.dtype == torch.int16
    x = torch.randn(7, 512)
    for kernel in ("lut", "decode", "direct"):
        model.lin.kernel = kernel
        torch.testing.assert_close(model.lin(x), x @ ref.t(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("out,inn", SHAPES)
@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm", "decode"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_int8_linear_within_activation_quantization_error(out, inn, kernel, tokens):
    if kernel == "fbgemm" and not K.fbgemm_available():
        pytest.skip("no fbgemm engine in this torch")
    layer, plain = runtime_linear(int_state("lin", out, inn, 8))
    assert isinstance(layer, R.IntLinear) and layer.int8_weight().dtype == torch.int8
    layer.kernel = kernel
    x = torch.randn(tokens, inn)
    want, got = plain(x), layer(x)
    if kernel == "decode":
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        return
    # each activation is off by at most half its quantization step (7 or 8 bits, per call or per token):
    # |dy_o| <= step / 2 * sum_i |W_oi|
    step = (x.max().clamp_min(0) - x.min().clamp_max(0)) / 127
    bound = step / 2 * plain.weight.abs().sum(1) * 1.01 + 1e-4
    err = (got - want).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 0  # really quantized activations


@pytest.mark.parametrize("bits,inn", [(2, 30), (3, 30), (3, 31), (4, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_int_linear_equals_decoded_layer(bits, inn, dtype):
    """int3 (stored 3 bits wide) runs held 4 bits wide, on int4's kernels when its rows start on a byte."""
    layer, plain = runtime_linear(int_state("lin", 33, inn, bits))  # 30 * 2 bits: rows not byte-aligned for int2
    assert layer.width == (2 if bits == 2 else 4)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == -(-33 * inn * layer.width // 8)
    aligned = inn * layer.width % 8 == 0  # 30 two-bit values: 7.5 bytes; 31 four-bit ones: 15.5
    assert (layer.book is None) == (not aligned)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for tokens in (1, 5, 40):
        x = torch.randn(tokens, inn).to(dtype)
        want = plain.to(dtype)(x)
        for kernel in ("auto", "lut", "bytes", "decode") if aligned else ("auto", "decode"):
            layer.kernel = kernel
            torch.testing.assert_close(layer(x), want, **tol)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("out,inn", [(33, 30), (70, 64), (40, 98)])  # in / 2 below, at and off the 16-byte vector
def test_int4_compiled_kernel_equals_its_reference_and_the_decoded_layer(bits, out, inn):
    """The compiled int4 Linear (nibbles widened in registers) is what the auto kernel runs for 1 to
    INT4_MAX_TOKENS tokens; equal to the pure reference and the decoded layer within fp32 rounding (1e-5)."""
    from quantnoise.runtime import ext
    if not ext.available():
        pytest.skip("compiled runtime kernels not built (python -m quantnoise.runtime)")
    layer, plain = runtime_linear(int_state("lin", out, inn, bits))
    assert layer.width == 4
    for tokens in (1, 2, 3, 5, 16, K.INT4_MAX_TOKENS, K.INT4_MAX_TOKENS + 1):
        x = torch.randn(tokens, inn)
        assert layer.choose_kernel(x) == ("int4" if tokens <= K.INT4_MAX_TOKENS else "bytes")
        want = plain(x)
        for bias in (None, layer.bias):
            ref = K.int4_linear_pure(x, layer.qweight, layer.qscale, bits, bias)
            got = K.int4_linear(x, layer.qweight, layer.qscale, bits, bias)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)  # the reference is the decoded layer
        layer.kernel = "auto"
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="do not hold"):
        torch.ops.quantnoise.int4_linear(torch.randn(1, inn), layer.qweight[:-1], layer.qscale.reshape(-1), 7, None)


def test_int8_linear_packed_state_dict_and_move_keep_the_weight():
    layer, plain = runtime_linear(int_state("lin", 40, 24, 8))
    if not K.fbgemm_available():
        pytest.skip("no fbgemm engine in this torch")
    assert layer._packed is not None and "qweight" not in layer._buffers
    q = layer.state_dict()["qweight"]
    torch.testing.assert_close(q.float() * layer.qscale, plain.weight, atol=0, rtol=0)
    layer.double().float()  # an _apply: unpacks, moves, repacks
    assert layer._packed is not None
    torch.testing.assert_close(layer.weight, plain.weight, atol=0, rtol=0)


@pytest.mark.parametrize("scheme", ["pq", "int8", "int4", "int3", "int6"])
def test_embedding_decodes_only_looked_up_rows(scheme, monkeypatch):
    vocab, dim = 500, 32
    state = pq_state("emb", vocab, dim, bias=False) if scheme == "pq" else int_state("emb", vocab, dim, int(scheme[3:]), bias=False)
    tensors, meta, ref = compressed(state)
    model = nn.Module()
    model.emb = nn.Embedding(vocab, dim, padding_idx=1, device="meta")
    R.fill_model_(model, tensors, meta)
    ids = torch.tensor([[3, 1, 499], [0, 3, 42]])
    got = model.emb(ids)
    torch.testing.assert_close(got, ref["emb.weight"][ids], atol=0, rtol=0)
    seen = []  # the decoder is asked for the looked-up rows only
    real = K.pq_rows if scheme == "pq" else K.int_rows
    if scheme == "pq":
        monkeypatch.setattr(K, "pq_rows", lambda codes, *a: seen.append(codes.shape[0]) or real(codes, *a))
    elif scheme in ("int4", "int3"):
        monkeypatch.setattr(K, "int_rows", lambda p, s, w, b, rows, *a: seen.append(rows.numel()) or real(p, s, w, b, rows, *a))
    else:
        seen.append(ids.numel())
    model.emb(ids)
    assert seen == [ids.numel()]


def test_tied_output_projection_shares_the_embedding_codes():
    state = pq_state("emb", 100, 16, bias=False)
    state["out.weight"] = state["emb.centroids"][state["emb.codes"].long()].reshape(100, 16)  # a tied head
    tensors, meta, ref = compressed(state)
    ref = ref["emb.weight"]
    assert meta["aliases"] == {"out.weight": "emb"}
    model = nn.Module()
    model.emb, model.out = nn.Embedding(100, 16, device="meta"), nn.Linear(16, 100, bias=False, device="meta")
    R.fill_model_(model, tensors, meta)
    assert isinstance(model.out, R.CodesLinear) and model.out.codes.data_ptr() == model.emb.codes.data_ptr()
    x = torch.randn(3, 16)
    torch.testing.assert_close(model.out(x), x @ ref.t(), atol=1e-4, rtol=1e-4)


def test_tied_uncompressed_weight_is_filled_as_the_same_tensor():
    emb = nn.Embedding(50, 8)
    tensors, meta = encode({"emb.weight": emb.weight.detach(), "out.weight": emb.weight.detach()}, {},
                           ExportOptions(rest_dtype="float32"))
    assert meta["aliases"] == {"out.weight": "emb.weight"} and list(tensors) == ["emb.weight"]
    model = nn.Module()
    model.emb, model.out = nn.Embedding(50, 8, device="meta"), nn.Linear(8, 50, bias=False, device="meta")
    R.fill_model_(model, tensors, meta)
    assert torch.equal(model.out.weight, emb.weight) and model.out.weight.data_ptr() == model.emb.weight.data_ptr()


def test_fill_refuses_a_model_of_another_shape():
    tensors, meta, _ = compressed(pq_state("lin", 64, 32))
    model = nn.Module()
    model.lin = nn.Linear(16, 64, device="meta")
    with pytest.raises(ValueError, match="stores shape"):
        R.fill_model_(model, tensors, meta)


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_int5_to_7_run_as_int8(bits):
    """int5-7, stored 5-7 bits wide, run held as int8 (fbgemm's kernel on CPU): the same integers."""
    state = int_state("lin", 40, 23, bits)
    layer, plain = runtime_linear(state)
    assert layer.width == 8 and torch.equal(layer.int8_weight(), state["lin.qweight"].reshape(40, 23))
    torch.testing.assert_close(layer.weight, plain.weight, atol=0, rtol=0)
    layer.kernel = "decode"
    x = torch.randn(6, 23)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", range(2, 9))
def test_layer_on_the_files_bit_stream_decodes_exactly(bits):
    """An IntLinear / IntEmbedding holding a file's stream as it is (width = bits, values straddling bytes)
    decodes the weight exactly and runs decode + matmul; odd shapes, rows starting mid-byte."""
    state = int_state("lin", 7, 13, bits)
    tensors, meta, ref = compressed(state)
    packed, scale = tensors["lin.qweight"], tensors["lin.qscale"]
    assert packed.numel() == -(-7 * 13 * bits // 8)
    if bits == 8:
        packed = R.stored_int(packed, bits, 8, (7, 13))
    lin = R.IntLinear(13, 7, packed, scale, bits, bits, state["lin.bias"])
    emb = R.IntEmbedding(7, 13, packed, scale, bits, bits)
    torch.testing.assert_close(lin.weight, ref["lin.weight"], atol=0, rtol=0)
    ids = torch.tensor([6, 0, 3, 3])
    torch.testing.assert_close(emb(ids), ref["lin.weight"][ids], atol=0, rtol=0)
    lin.kernel = "decode"
    x = torch.randn(3, 13)
    torch.testing.assert_close(lin(x), x @ ref["lin.weight"].t() + state["lin.bias"], atol=1e-4, rtol=1e-4)


def test_unpack_at_matches_unpack():
    g = torch.Generator().manual_seed(0)
    for width in range(2, 9):
        u = torch.randint(0, 2**width, (101,), generator=g).to(torch.uint8)
        packed = pack(u, width)
        idx = torch.randint(0, 101, (50,), generator=g)
        assert torch.equal(K.unpack_at(packed, width, idx), unpack(packed, width, 101)[idx])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_follow_a_cuda_input():
    for state in (pq_state("lin", 64, 32), int_state("lin", 64, 32, 8), int_state("lin", 64, 32, 4)):
        layer, plain = runtime_linear(state)
        layer, plain = layer.cuda(), plain.cuda()
        for tokens in (1, 100):
            x = torch.randn(tokens, 32, device="cuda")
            torch.testing.assert_close(layer(x), plain(x), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not K.runtime_ext.available(), reason="compiled kernel not built (python -m quantnoise.runtime)")
@pytest.mark.parametrize("bs,k,codes_dtype", [(4, 256, torch.uint8), (8, 256, torch.uint8), (16, 256, torch.uint8),
                                              (8, 16, torch.uint8), (4, 1024, torch.int16)])
def test_compiled_lut_equals_pure_pytorch(bs, k, codes_dtype):
    """Same sums in another order: equal within fp32 rounding (a relative 1e-5 of the sum of |terms|)."""
    g = torch.Generator().manual_seed(bs * k)
    for tokens in (1, 2, 3, 8, 16, 17, 40):  # past 16: groups of 16 tokens, each its own table
        out, m = int(torch.randint(1, 300, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))
        codes = torch.randint(0, k, (out, m), generator=g).to(codes_dtype)
        cents, x = torch.randn(k, bs, generator=g), torch.randn(tokens, m * bs, generator=g)
        assert K.use_compiled(x, codes)
        got, want = K.pq_linear_lut(x, codes, cents, compiled=True), K.pq_linear_lut(x, codes, cents, compiled=False)
        table = (x.reshape(tokens, m, bs) @ cents.t()).abs()  # (T, m, k)
        scale = table.gather(2, codes.long().t().unsqueeze(0).expand(tokens, m, out)).sum(1)  # (T, out): sum |terms|
        assert got.shape == want.shape == (tokens, out)
        assert ((got - want).abs() <= 1e-5 * scale + 1e-6).all()
        assert not torch.equal(got, torch.zeros_like(got))


def direct_cases(bs, k, codes_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    for out, m in ((1, 3), (5, 1), (37, 6), (70, 17), (300, 384 // bs)):  # rows below / off / at the tiles,
        codes = torch.randint(0, k, (out, m), generator=g).to(codes_dtype)  # features off / at the vector width
        yield codes, torch.randn(k, bs, generator=g), torch.randn(out, generator=g), g


@pytest.mark.skipif(not K.runtime_ext.available(), reason="compiled kernel not built (python -m quantnoise.runtime)")
@pytest.mark.parametrize("bs,k,codes_dtype", [(4, 256, torch.uint8), (8, 256, torch.uint8), (8, 16, torch.uint8),
                                              (16, 64, torch.uint8), (5, 32, torch.uint8), (4, 1024, torch.int16),
                                              (8, 300, torch.int16)])
def test_direct_kernel_equals_its_reference(bs, k, codes_dtype):
    """The compiled pq Linear with no table (bs 4 / 8 / 16 vectorised, 5 on the portable loop) against its pure
    reference (decode + matmul): the same products summed in another order, so equal within fp32 rounding, a
    relative 1e-5 of the sum of |terms|; contiguous, row-strided (read in place) and column-strided (copied)
    inputs; bias or not; token counts below, at and past the 8-token tile."""
    for codes, cents, bias, g in direct_cases(bs, k, codes_dtype, bs * k):
        out, m = codes.shape
        w = K.pq_linear_direct_pure(torch.eye(m * bs), codes, cents).t()  # (out, in): the decoded weight
        torch.testing.assert_close(w, cents[codes.long()].reshape(out, m * bs), atol=0, rtol=0)
        for tokens in (1, 3, 16, 33):
            wide = torch.randn(tokens, 2 * m * bs + 3, generator=g)
            for x in (wide[:, :m * bs].contiguous(), wide[:, 3:3 + m * bs], wide[:, 3::2][:, :m * bs]):
                scale = x.abs() @ w.abs().t()  # (T, out): sum of |terms|
                for b in (None, bias):
                    got, want = K.pq_linear_direct(x, codes, cents, b), K.pq_linear_direct_pure(x, codes, cents, b)
                    assert got.shape == want.shape == (tokens, out) and got.dtype == torch.float32
                    assert ((got - want).abs() <= 1e-5 * scale + 1e-6).all(), (got - want).abs().max()
        assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.skipif(not K.runtime_ext.available(), reason="compiled kernel not built (python -m quantnoise.runtime)")
def test_direct_kernel_threads_and_layer_dispatch():
    """Output rows shared out over 2 threads give the 1-thread result exactly (each row summed by one thread);
    the layer runs the kernel for few tokens (``direct_wins``), the table / decode beyond, all equal to the
    decoded layer; a bad shape is one clear error."""
    layer, plain = runtime_linear(pq_state("lin", 512, 384, bs=8, k=256, seed=4))
    x = torch.randn(2, 5, 384)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K.pq_linear_direct(x[0], layer.codes, layer.centroids, layer.bias)
        torch.set_num_threads(2)
        two = K.pq_linear_direct(x[0], layer.codes, layer.centroids, layer.bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    for tokens in (1, 3, K.DIRECT_TOKEN_ROWS // 512, K.DIRECT_TOKEN_ROWS // 512 + 1, 64):
        x2 = torch.randn(tokens, 384)
        kernel = layer.choose_kernel(x2)
        assert (kernel == "direct") == (tokens * 512 <= K.DIRECT_TOKEN_ROWS)
        with torch.no_grad():
            torch.testing.assert_close(layer(x2), plain(x2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-4, rtol=1e-4)  # (2, 5, in): 10 tokens
    with pytest.raises(RuntimeError, match="x has 380 features, the codes 384"):
        K.pq_linear_direct(torch.randn(1, 380), layer.codes, layer.centroids)
    with pytest.raises(RuntimeError, match="bias of 3 values for 512 outputs"):
        K.pq_linear_direct(torch.randn(1, 384), layer.codes, layer.centroids, torch.zeros(3))


@pytest.mark.skipif(not K.runtime_ext.available(), reason="compiled kernel not built (python -m quantnoise.runtime)")
@pytest.mark.parametrize("bs,k,codes_dtype", [(2, 256, torch.uint8), (4, 16, torch.uint8), (5, 256, torch.uint8),
                                              (8, 256, torch.uint8), (16, 64, torch.uint8), (4, 1024, torch.int16)])
def test_compiled_decode_equals_pure_pytorch(bs, k, codes_dtype):
    """The compiled decode copies the same centroid values: identical to index_select's rows."""
    g = torch.Generator().manual_seed(bs + k)
    codes = torch.randint(0, k, (37, 11), generator=g).to(codes_dtype)
    cents = torch.randn(k, bs, generator=g)
    got, want = K.pq_rows(codes, cents, torch.float32, compiled=True), K.pq_rows(codes, cents, torch.float32, compiled=False)
    assert got.shape == (37, 11 * bs) and torch.equal(got, want)
    assert torch.equal(want[5, 3 * bs:4 * bs], cents[codes[5, 3].long()])


def test_decode_in_chunks_equals_whole(monkeypatch):
    """Few tokens: rows decoded a chunk at a time; many: the whole weight at once.  Same product."""
    codes = torch.randint(0, 256, (300, 16), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    cents, x = torch.randn(256, 8), torch.randn(3, 128)
    whole = K.pq_linear_decode(x, codes, cents)
    monkeypatch.setattr(K, "DECODE_ROWS_ELEMS", 128 * 7)  # 7 rows per chunk: 43 chunks for 3 tokens
    calls = []
    real = K.pq_rows
    monkeypatch.setattr(K, "pq_rows", lambda c, *a, **kw: calls.append(c.shape[0]) or real(c, *a, **kw))
    torch.testing.assert_close(K.pq_linear_decode(x, codes, cents), whole, atol=1e-5, rtol=1e-5)
    assert calls[0] == 7 and sum(calls) == 300
    calls.clear()
    K.pq_linear_decode(torch.randn(8, 128), codes, cents)  # output 8 x 300 = 2400 elements: 18 rows at a time
    assert calls[0] == 18 and sum(calls) == 300


@pytest.mark.parametrize("bits", [3, 5])
def test_version_1_layout_runs_the_same(bits):
    """A format version 1 file's int3 (4 bits wide) / int5 (8 bits wide) layer gives the runtime layer a
    version 2 file gives."""
    from quantnoise.export import legacy_pack_width

    state = int_state("lin", 24, 16, bits)
    layers = []
    for old in (False, True):
        tensors, meta, ref = compressed(state)
        if old:
            w = legacy_pack_width(bits)
            tensors["lin.qweight"] = pack(unpack(tensors["lin.qweight"], bits, 24 * 16), w)
            meta["layers"]["lin"]["pack_width"], meta["format_version"] = w, 1
        model = nn.Module()
        model.lin = nn.Linear(16, 24, device="meta")
        R.fill_model_(model, tensors, meta)
        layers.append(model.lin)
    new, old = layers
    assert new.width == old.width == legacy_pack_width(bits)
    torch.testing.assert_close(old.weight, ref["lin.weight"], atol=0, rtol=0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(old(x), new(x), atol=0, rtol=0)


# ------------------------------------------------------------------------- issue 22 items 4, 7, 8, 12, 13
@pytest.mark.parametrize("scheme", ["pq", "int4", "int8"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_input_gradients_equal_the_decoded_layers(scheme, tokens):
    """The table kernels (pq / int4 at 1 token) and fbgemm (int8) have no backward: a forward that needs a
    gradient takes the decode path, so x.grad is the decoded layer's (was None, with only a torch warning)."""
    state = pq_state("lin", 48, 64, k=64) if scheme == "pq" else int_state("lin", 48, 64, int(scheme[3:]))
    layer, plain = runtime_linear(state)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(0))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(x1).pow(2).sum().backward()
    plain(x2).pow(2).sum().backward()
    assert x1.grad is not None
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # without a gradient the fast kernels still run (int8: activations quantized on the fly)
        want = plain(x)
        tol = 0.03 * want.abs().max().item() if scheme == "int8" else 1e-4
        torch.testing.assert_close(layer(x), want, atol=tol, rtol=1e-3)


def test_a_linear_tied_to_an_int8_linear_loads_and_shares_the_packed_weight():
    """pack_() deleted ``qweight`` before the alias read it (AttributeError)."""
    state = int_state("lin", 40, 24, 8)
    w = state["lin.qweight"].float() * state["lin.qscale"].float().reshape(-1, 1)
    state["out.weight"] = w.clone()
    tensors, meta, ref = compressed(state)
    assert meta["aliases"] == {"out.weight": "lin"}
    model = nn.Module()
    model.lin, model.out = nn.Linear(24, 40, device="meta"), nn.Linear(24, 40, bias=False, device="meta")
    R.fill_model_(model, tensors, meta)
    assert isinstance(model.out, R.IntLinear)
    if K.fbgemm_available():
        assert model.out._packed is model.lin._packed  # one packed copy for both
    x = torch.randn(3, 24)
    with torch.no_grad():
        want = x @ ref["lin.weight"].t()
        torch.testing.assert_close(model.out(x), want, atol=0.03 * want.abs().max().item(), rtol=0)
    torch.testing.assert_close(model.out.weight, ref["lin.weight"], atol=0, rtol=0)


def test_lazy_int8_packing_is_thread_safe():
    """fill_model_(pack=False) packs at the first forward; concurrent first forwards raced (AttributeError /
    KeyError 'qweight' in 6 of 60)."""
    if not K.fbgemm_available():
        pytest.skip("no fbgemm engine in this torch")
    tensors, meta, ref = compressed(int_state("lin", 256, 256, 8))
    x = torch.randn(4, 256)
    errors, outs = [], []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave every few bytecodes: the race shows up in most trials
    try:
        trials(tensors, meta, x, errors, outs)
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[:3]
    assert len(outs) == 200


def trials(tensors, meta, x, errors, outs):
    """20 fresh layers, each with 10 threads making its first forward at once (half the fbgemm path, which packs,
    half the decode, which reads the weight)."""
    import threading

    for trial in range(20):
        model = nn.Module()
        model.lin = nn.Linear(256, 256, device="meta")
        R.fill_model_(model, dict(tensors), meta, pack=False)
        layer = model.lin
        layer.kernel = "auto"
        assert layer._packed is None
        barrier = threading.Barrier(10)

        def first_forward(i):
            barrier.wait()
            try:
                with torch.no_grad():
                    outs.append(layer(x) if i % 2 else layer.weight[:1] @ x.t())  # fbgemm (packs), and the decode
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=first_forward, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert layer._packed is not None


def test_a_packed_int8_linear_loads_its_own_state_dict():
    """A packed IntLinear refused its own state dict (unexpected key 'qweight')."""
    layer, plain = runtime_linear(int_state("lin", 40, 24, 8))
    other, _ = runtime_linear(int_state("lin", 40, 24, 8, seed=5))
    x = torch.randn(3, 24)
    with torch.no_grad():
        want = other(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), want, atol=0, rtol=0)
    torch.testing.assert_close(layer.weight, other.weight, atol=0, rtol=0)
    if K.fbgemm_available():
        assert layer._packed is not None and "qweight" not in layer._buffers  # still packed once loaded


@pytest.mark.parametrize("scheme", ["pq", "int8", "int4"])
def test_embedding_ids_out_of_range_raise_as_nn_embedding_does(scheme):
    """id -1 returned the last row, where nn.Embedding raises IndexError."""
    state = pq_state("emb", 50, 16, bias=False) if scheme == "pq" else int_state("emb", 50, 16, int(scheme[3:]), bias=False)
    tensors, meta, _ = compressed(state)
    model = nn.Module()
    model.emb = nn.Embedding(50, 16, device="meta")
    R.fill_model_(model, tensors, meta)
    for bad in (-1, 50):
        with pytest.raises(IndexError):
            nn.Embedding(50, 16)(torch.tensor([3, bad]))
        with pytest.raises(IndexError, match=f"index {bad} is out of range"):
            model.emb(torch.tensor([[3, bad]]))
    assert model.emb(torch.tensor([0, 49])).shape == (2, 16)
    assert model.emb(torch.zeros(0, dtype=torch.long)).shape == (0, 16)
