"""quantnoise.runtime.load with untrusted files: a .qnz can only fill the model it belongs to (no new
attributes, no runtime-layer buffer replaced, no code beyond its codebook), and a file too large to decode
says so (issue 22, items 1 and 2)."""
import json
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from safetensors.torch import save
import torch.nn.functional as F
from torch import nn

from quantnoise import export
from quantnoise import runtime as R
from quantnoise.compress.layers import LayerRule
from quantnoise.runtime.layers import CodesLinear

from test_runtime_layers import int_state, pq_state


def encoded(state):
    return export.encode(state, {}, export.ExportOptions(rest_dtype="float32"))


def write_signed(path, tensors, meta):
    """A .qnz with valid checksums for whatever ``tensors`` / ``meta`` hold (a crafted file)."""
    meta["crc32"] = {k: export._crc(t) for k, t in tensors.items()}
    text = json.dumps(meta)
    path.write_bytes(save(tensors, metadata={"qnz": text, "qnz_crc32": str(zlib.crc32(text.encode()))}))
    return path


def meta_model(out=64, inn=64, extra=False):
    model = nn.Module()
    model.lin = nn.Linear(inn, out, device="meta")
    if extra:
        model.tied = nn.Linear(inn, out, bias=False, device="meta")
    return model


def codes_onto_pq_layer():
    """A pq layer (k = 4) and a dense int16 tensor of codes 30000 aliased onto its ``codes`` (what segfaulted
    ``pq_decode`` with a 4096-wide block)."""
    tensors, meta = encoded(pq_state("lin", 64, 64, bs=8, k=4))
    tensors["d"] = torch.full((64, 8), 30000, dtype=torch.int16)
    meta["dense"]["d"] = {"dtype": "int16"}
    meta["aliases"]["lin.codes"] = "d"
    return tensors, meta


def test_an_alias_onto_a_runtime_buffer_is_refused_by_the_reader(tmp_path):
    path = write_signed(tmp_path / "m.qnz", *codes_onto_pq_layer())
    with pytest.raises(ValueError, match=r"alias 'lin.codes' is not the weight of another layer"):
        export.read_qnz(path)


@pytest.mark.parametrize("case", ["alias_codes", "dense_codes", "dense_new", "dense_book", "dense_shape",
                                  "alias_shape", "alias_new", "layer_missing", "dense_kind", "alias_kind"])
def test_fill_model_only_fills_tensors_the_model_has(case):
    """Checked against the model itself, whatever check_map let through: one ValueError line, nothing set."""
    if case == "alias_codes":
        tensors, meta = codes_onto_pq_layer()
        model = meta_model()
        model.register_buffer("d", torch.empty(64, 8, dtype=torch.int16, device="meta"))  # a dense key it has
        why = "ties 'lin.codes', which is no parameter or buffer"
    else:
        tensors, meta = encoded(int_state("lin", 64, 64, bits=4) if case == "dense_book" else pq_state("lin", 64, 64, k=4))
        model = meta_model(extra=case.startswith("alias"))
        if case == "dense_codes":  # the file's own codes replaced by larger ones, as a dense tensor
            meta["dense"]["lin.codes"] = {"dtype": "int16"}
            tensors["lin.codes"] = torch.full((64, 8), 3000, dtype=torch.int16)
            why = "stores tensor 'lin.codes', which is no parameter or buffer"
        elif case == "dense_new":  # fairseq: decoder.junk became a new parameter
            meta["dense"]["junk"] = {"dtype": "float32"}
            tensors["junk"] = torch.zeros(3)
            why = "stores tensor 'junk', which is no parameter or buffer"
        elif case == "dense_book":  # int4's byte codebook replaced (k = 1 book, codes up to 233: exit 139)
            meta["dense"]["lin.book"] = {"dtype": "float32"}
            tensors["lin.book"] = torch.zeros(1, 2)
            why = "stores tensor 'lin.book', which is no parameter or buffer"
        elif case == "dense_shape":
            tensors["lin.bias"] = torch.zeros(65)
            why = r"tensor lin.bias: the .qnz stores shape \[65\] but the model has \[64\]"
        elif case == "dense_kind":
            tensors["lin.bias"] = torch.zeros(64, dtype=torch.int64)
            meta["dense"]["lin.bias"] = {"dtype": "int64"}
            why = "stores a int64 tensor but the model's is float32"
        elif case == "alias_shape":
            model.tied = nn.Linear(32, 64, bias=False, device="meta")
            meta["aliases"]["tied.weight"] = "lin"
            why = r"tied.weight is tied to lin in the .qnz, of shape \[64, 64\], but the model's has \[64, 32\]"
        elif case == "alias_kind":  # a float weight tied to an integer tensor of the file
            model.register_buffer("ids", torch.empty(64, 64, dtype=torch.int16, device="meta"))
            tensors["ids"] = torch.zeros(64, 64, dtype=torch.int16)
            meta["dense"]["ids"] = {"dtype": "int16"}
            meta["aliases"]["tied.weight"] = "ids"
            why = "tied.weight is tied to ids, a int16 tensor, but the model's is float32"
        elif case == "alias_new":
            meta["aliases"]["other.weight"] = "lin"
            why = "ties 'other.weight', which is no parameter or buffer"
        else:  # a layer naming a module the model lacks: was an AttributeError traceback
            meta["layers"]["nothere"] = meta["layers"].pop("lin")
            why = "compresses layer 'nothere', which is no layer with a weight"
    with pytest.raises(ValueError, match=why) as e:
        R.fill_model_(model, tensors, meta)
    assert len(str(e.value).splitlines()) == 1
    assert all(t.is_meta for t in model.state_dict().values())  # checked before anything is filled


def test_a_runtime_layer_refuses_codes_beyond_its_codebook():
    cents = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"codes in \[3000, 3000\] but the codebook has 4 centroids"):
        CodesLinear(64, 16, torch.full((16, 8), 3000, dtype=torch.int16), cents, None)
    with pytest.raises(ValueError, match=r"codes in \[-1, 0\]"):
        CodesLinear(64, 16, torch.tensor([-1] + [0] * 127, dtype=torch.int16), cents, None)
    with pytest.raises(ValueError, match="100 uint8 codes, expected 128"):
        CodesLinear(64, 16, torch.zeros(100, dtype=torch.uint8), cents, None)
    layer = CodesLinear(64, 16, torch.zeros(16, 8, dtype=torch.uint8), cents, None)
    bad = dict(layer.state_dict(), codes=torch.full((16, 8), 200, dtype=torch.uint8))
    with pytest.raises(ValueError, match="codebook has 4 centroids"):  # loading checks them too, first
        layer.load_state_dict(bad)
    assert int(layer.codes.max()) == 0  # the layer's own codes are untouched


def test_block_sizes_are_bounded(tmp_path):
    """A 0.5 MB file with one 4096-wide block per row decoded to 16 GiB: the block size is bounded at export and
    read, so a file decodes to at most ~4 * 64 times its size."""
    with pytest.raises(ValueError, match="block_size=128"):
        LayerRule(block_size=128)
    tensors, meta = encoded(pq_state("lin", 4, 4096, bs=8, k=4))
    meta["layers"]["lin"].update(block_size=4096, shape=[1024, 4096])
    tensors["lin.codes"] = torch.zeros(1024, dtype=torch.uint8)
    tensors["lin.centroids"] = torch.zeros(4, 4096, dtype=torch.float16)
    with pytest.raises(ValueError, match="block_size 4096, beyond the largest quantnoise writes"):
        export.read_qnz(write_signed(tmp_path / "m.qnz", tensors, meta))


def test_decoding_beyond_memory_says_how_much_it_needs(tmp_path):
    """Under a memory limit the decode says it needs more memory, not that the map does not match its tensors."""
    tensors, meta = encoded(pq_state("lin", 4096, 2048, bs=64, k=256, bias=False))  # 128 KiB codes -> 32 MiB
    meta["layers"]["lin"]["dtype"] = "float64"  # 64 MiB decoded
    path = write_signed(tmp_path / "m.qnz", tensors, meta)
    script = textwrap.dedent(f"""
        import resource, sys
        from quantnoise import export
        tensors, meta = export.read_qnz({str(path)!r})
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), resource.RLIM_INFINITY))
        try:
            export.decode(tensors, meta)
        except MemoryError as e:
            print("MemoryError", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "MemoryError decoding the .qnz needs 0.06 GiB" in out.stdout, (out.stdout, out.stderr[-2000:])


class SharedEmbeddings(nn.Module):
    """fairseq's share_all_embeddings: one Embedding module under two names (encoder / decoder embed_tokens)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.embed_tokens = self.decoder.embed_tokens = nn.Embedding(64, 16)
        self.out = nn.Linear(16, 8)


def test_one_module_under_two_names_loads_as_one_shared_runtime_layer(tmp_path, caplog):
    """Issue 33 item 17: the second name of a shared module got a decoded fp32 copy of the weight."""
    from quantnoise import compress_, load_qnz, save_qnz

    torch.manual_seed(0)
    model = SharedEmbeddings()
    compress_(model, LayerRule(pattern="embed_tokens", block_size=4, n_centroids=16))
    assert model.encoder.embed_tokens is model.decoder.embed_tokens
    save_qnz(model, tmp_path / "m.qnz")
    with torch.device("meta"):
        fresh = SharedEmbeddings()
    with caplog.at_level("WARNING"):
        loaded = load_qnz(tmp_path / "m.qnz", fresh)
    assert "decoding it" not in caplog.text, caplog.text
    assert isinstance(loaded.encoder.embed_tokens, R.RuntimeMixin)
    assert loaded.decoder.embed_tokens is loaded.encoder.embed_tokens
    ids = torch.tensor([[1, 5, 63]])
    with torch.no_grad():  # fp16 codebook: each entry rounds alone
        assert torch.equal(loaded.decoder.embed_tokens(ids), model.decoder.embed_tokens(ids).half().float())


class Offset(nn.Embedding):
    """Like OPT's / BART's position tables: its own forward hands shifted ids to the base forward."""

    def __init__(self, n, d):
        self.offset = 2
        super().__init__(n + self.offset, d)

    def forward(self, ids):
        return super().forward(ids + self.offset)


class Scaled(nn.Embedding):
    """Like BART's scaled word embedding."""

    def __init__(self, n, d, scale):
        super().__init__(n, d)
        self.scale = scale

    def forward(self, ids):
        return super().forward(ids) * self.scale


class ReadsWeight(nn.Embedding):
    """Its own forward reads ``self.weight`` (fairseq's LearnedPositionalEmbedding does): decoded at load."""

    def forward(self, ids):
        return F.embedding(ids + 1, self.weight)


class OwnForwards(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos, self.word, self.read = Offset(30, 16), Scaled(64, 16, 4.0), ReadsWeight(32, 16)
        self.word2 = Scaled(64, 16, 0.5)
        self.word2.weight = self.word.weight  # tied, as BART's encoder.embed_tokens to shared

    def forward(self, ids):
        return self.pos(ids) + self.word(ids) + self.read(ids) + self.word2(ids)


@pytest.mark.parametrize("rule", [LayerRule(block_size=4, n_centroids=16), LayerRule(scheme="scalar", bits=4)],
                         ids=["pq", "int4"])
def test_subclasses_whose_forward_calls_the_base_forward_run_compressed_and_resave_the_same(tmp_path, caplog, rule):
    """OPT / BART's position tables and scaled embeddings were decoded at load (an fp32 copy each) and so re-saved
    dense: a runtime subclass now keeps their forward over the runtime lookup; one reading self.weight is decoded."""
    from quantnoise import compress_, load_qnz, save_qnz

    torch.manual_seed(0)
    model = OwnForwards().eval()
    compress_(model, rule)
    meta = save_qnz(model, tmp_path / "m.qnz")
    assert meta["aliases"] == {"word2.weight": "word"}
    with torch.device("meta"):
        fresh = OwnForwards()
    fresh.word2.weight = fresh.word.weight
    with caplog.at_level("WARNING"):
        loaded = load_qnz(tmp_path / "m.qnz", fresh)
    assert "layer read (ReadsWeight) has no compressed kernel; decoding it" in caplog.text
    assert caplog.text.count("decoding it") == 1, caplog.text
    for name, kind in (("pos", Offset), ("word", Scaled), ("word2", Scaled)):
        m = loaded.get_submodule(name)
        assert isinstance(m, R.RuntimeMixin) and isinstance(m, kind) and type(m).forward is kind.forward, name
    assert loaded.pos.offset == 2 and (loaded.word.scale, loaded.word2.scale) == (4.0, 0.5)
    assert loaded.word2.codes.data_ptr() == loaded.word.codes.data_ptr() if rule.scheme == "pq" else \
        loaded.word2.qweight.data_ptr() == loaded.word.qweight.data_ptr()  # the tied copy shares the stored weight
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(loaded(ids), want, rtol=2e-3, atol=2e-3)  # fp16 codebook / rest
    save_qnz(loaded, tmp_path / "again.qnz")  # the runtime subclasses re-save as the layers they were loaded from
    (ta, ma), (tb, mb) = export.read_qnz(tmp_path / "m.qnz"), export.read_qnz(tmp_path / "again.qnz")
    assert set(ma["layers"]) == {"pos", "word", "read"} and set(mb["layers"]) == {"pos", "word"}
    assert "read.weight" in mb["dense"]  # a decoded layer (no kernel runs its forward) re-saves dense: named above
    for key in ("pos", "word"):
        assert mb["layers"][key] == ma["layers"][key]
    torch.save(loaded, tmp_path / "whole.pt")  # the runtime subclasses pickle (defined in quantnoise.runtime.layers)
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(ids), loaded(ids))


def test_a_runtime_subclass_keeps_the_layers_own_buffers_and_attributes():
    from quantnoise.runtime.load import _with_own_forward

    like = Offset(30, 16)
    like.register_buffer("gain", torch.full((16,), 0.5), persistent=False)  # made when the model is built
    codes, cents = torch.randint(0, 16, (32 * 4,), dtype=torch.uint8), torch.randn(16, 4)
    new = _with_own_forward(R.CodesEmbedding(32, 16, codes, cents), like)
    assert type(new).__name__ == "CodesOffset" and isinstance(new, Offset) and isinstance(new, R.CodesEmbedding)
    assert new.offset == 2 and new.gain is like.gain and "weight" not in new._parameters
    ids = torch.tensor([[0, 5, 27]])
    assert torch.equal(new(ids), cents[codes.long()].reshape(32, 16)[ids + 2])  # Offset's forward over the codes
