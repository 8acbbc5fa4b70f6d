"""``quantnoise quantize`` of a *stock* fairseq checkpoint (``transformer_lm``, trained without the plugin,
validation on, so it is fairseq's ``checkpoint_best.pt``), through every route the docs name:
pq with int16 codes (k > 256) and scalar int4 end to end; the ``.qnz`` compared with the quantized
checkpoint it came from; evaluated by ``fairseq-eval-lm`` on the checkpoint (plugin), the ``.qnz``
(plugin) and the decompressed checkpoint (stock, also under ``--arch``); loaded by
``from_pretrained`` and by ``fairseq-train --restore-file``."""
import re
import sys

import pytest
import torch

from conftest import USER_DIR, run

pytestmark = pytest.mark.slow
# pre-norm, as fairseq's named transformer_lm variants force it: the checkpoint then also loads as one of them
SIZE = ["--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "256",
        "--decoder-attention-heads", "4", "--decoder-normalize-before"]
TRAIN = ["--task", "language_modeling", "--tokens-per-sample", "32", "--max-tokens", "512", "--optimizer", "adam",
         "--lr", "0.002", "--no-progress-bar", "--log-format", "simple", "--num-workers", "0", "--seed", "1",
         "--no-epoch-checkpoints", *SIZE]
EVAL = ["--tokens-per-sample", "32", "--max-tokens", "512", "--num-workers", "0"]
PLAN = """seed: 1
stages:
  - {pattern: 'fc[12]', block_size: 4, n_centroids: 16}
  - {pattern: 'embed_tokens', block_size: 4, n_centroids: 300}
  - {pattern: '_proj', scheme: scalar, bits: 8}
"""


def qn(*args):
    return run([sys.executable, "-m", "quantnoise.cli", *args])


def ppl(*args, env=None) -> float:
    out = run(["fairseq-eval-lm", *args, *EVAL], env=env)
    return float(re.search(r"Perplexity: ([0-9.]+)", out.stdout + out.stderr).group(1))


@pytest.fixture(scope="module")
def best(lm_data, tmp_path_factory):
    """checkpoint_best.pt of a stock transformer_lm (no plugin) trained 12 updates with validation."""
    save = tmp_path_factory.mktemp("stock")
    run(["fairseq-train", lm_data, "--arch", "transformer_lm", *TRAIN, "--max-update", "12", "--save-dir", save])
    state = torch.load(save / "checkpoint_best.pt", weights_only=True)
    assert state["cfg"]["model"]["_name"] == "transformer_lm" and state["extra_state"].get("best") is not None
    assert state["last_optimizer_state"]  # a real training checkpoint, optimizer state and all
    return save / "checkpoint_best.pt"


def test_pq_int16_codes_and_scalar_layers_from_a_stock_best_checkpoint(best, lm_data, tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN)
    qn("quantize", best, "-o", tmp_path / "q.pt", "--config", tmp_path / "plan.yaml")
    q = torch.load(tmp_path / "q.pt", weights_only=True)
    assert q["cfg"]["model"]["_name"] == "qn_transformer_lm" and "last_optimizer_state" not in q
    emb = "decoder.embed_tokens"
    assert q["model"][f"{emb}.codes"].dtype == torch.int16 and q["model"][f"{emb}.centroids"].shape == (300, 4)
    assert "decoder.layers.0.self_attn.q_proj.qweight" in q["model"]
    qn("export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz")

    # the .qnz holds exactly the quantized checkpoint: codebook[codes] with fp16 centroids, q * scale,
    # and every other tensor rounded to fp16
    from quantnoise.export import load_qnz, read_qnz

    tensors, meta = read_qnz(tmp_path / "m.qnz")
    assert tensors[f"{emb}.codes"].dtype == torch.int16 and meta["layers"][emb]["n_centroids"] == 300
    state, _ = load_qnz(tmp_path / "m.qnz")
    for name, e in meta["layers"].items():
        if e["scheme"] == "pq":
            want = q["model"][f"{name}.centroids"].half().float()[q["model"][f"{name}.codes"].long()]
        else:
            want = q["model"][f"{name}.qweight"].float() * q["model"][f"{name}.qscale"]
        assert torch.equal(state[f"{name}.weight"], want.reshape(e["shape"])), name
    for key in meta["dense"]:
        assert torch.equal(state[key], q["model"][key].half().to(q["model"][key].dtype)), key
    assert len(meta["layers"]) == 2 * 6 + 2 and not meta["aliases"]  # 2 x (q,k,v,out,fc1,fc2) + emb + out

    (tmp_path / "plain").mkdir()
    (tmp_path / "gpt").mkdir()
    qn("decompress", tmp_path / "m.qnz", "-o", tmp_path / "plain" / "d.pt")
    qn("decompress", tmp_path / "m.qnz", "-o", tmp_path / "gpt" / "d.pt", "--arch", "transformer_lm_gpt")
    assert torch.load(tmp_path / "gpt" / "d.pt", weights_only=True)["cfg"]["model"]["_name"] == "transformer_lm_gpt"

    checkpoint = ppl(lm_data, "--path", tmp_path / "q.pt", "--user-dir", USER_DIR)  # PQ layers, fp32 centroids
    decoded = ppl(lm_data, "--path", tmp_path / "m.qnz", "--user-dir", USER_DIR, env={"QUANTNOISE_QNZ_DECODE": "1"})
    qnz = ppl(lm_data, "--path", tmp_path / "m.qnz", "--user-dir", USER_DIR)  # compressed runtime layers
    stock = ppl(lm_data, "--path", tmp_path / "plain" / "d.pt")  # no plugin
    renamed = ppl(lm_data, "--path", tmp_path / "gpt" / "d.pt")  # the weights decide the sizes, not the arch name
    assert decoded == stock == renamed
    assert abs(qnz - decoded) / decoded < 0.001, (qnz, decoded)  # issue 10: same perplexity within 0.1%
    assert abs(qnz - checkpoint) / checkpoint < 0.002, (qnz, checkpoint)  # fp16 rounding only


def test_scalar_int4_end_to_end_is_exact(best, lm_data, tmp_path):
    qn("quantize", best, "-o", tmp_path / "q.pt", "--scheme", "scalar", "--bits", "4")
    qn("export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz", "--rest", "float32")
    from quantnoise.export import read_qnz

    tensors, meta = read_qnz(tmp_path / "m.qnz")
    fc1 = meta["layers"]["decoder.layers.0.fc1"]
    assert fc1["bits"] == 4 and fc1["pack_width"] == 4 and tensors["decoder.layers.0.fc1.qweight"].numel() == 256 * 64 // 2
    qn("decompress", tmp_path / "m.qnz", "-o", tmp_path / "d.pt")
    checkpoint = ppl(lm_data, "--path", tmp_path / "q.pt", "--user-dir", USER_DIR)  # ScalarLinear layers
    qnz = ppl(lm_data, "--path", tmp_path / "m.qnz", "--user-dir", USER_DIR)
    stock = ppl(lm_data, "--path", tmp_path / "d.pt")
    assert checkpoint == qnz == stock  # int4 packing and fp32 scales are lossless, --rest float32


def test_qnz_loads_through_from_pretrained_and_restore_file(best, lm_data, tmp_path):
    from fairseq.models.transformer_lm import TransformerLanguageModel

    from quantnoise.export import load_qnz

    qn("quantize", best, "-o", tmp_path / "q.pt", "--block-size", "4", "--centroids", "32")
    (tmp_path / "hub").mkdir()
    qn("export", tmp_path / "q.pt", "-o", tmp_path / "hub" / "m.qnz")
    qn("decompress", tmp_path / "hub" / "m.qnz", "-o", tmp_path / "hub" / "d.pt")
    tokens = torch.tensor([[2, 10, 11, 12, 13, 14]])
    outs = []
    for name, extra in (("m.qnz", {"user_dir": USER_DIR}), ("d.pt", {})):
        hub = TransformerLanguageModel.from_pretrained(str(tmp_path / "hub"), name, str(lm_data), **extra)
        model = hub.models[0]  # already in eval mode (and fairseq's eval() returns None, not the model)
        assert not model.training
        with torch.no_grad():
            outs.append(model(tokens)[0])
    # m.qnz runs on the compressed runtime layers (issue 10), d.pt on decoded fp32 weights: equal within float tolerance
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(outs[0]).all()

    # fine-tune from the .qnz: a tiny learning rate, so the trained weights stay next to the file's
    run(["fairseq-train", lm_data, "--user-dir", USER_DIR, "--arch", "qn_transformer_lm", *TRAIN, "--lr", "1e-7",
         "--disable-validation", "--restore-file", tmp_path / "hub" / "m.qnz", "--reset-optimizer",
         "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters", "--max-update", "2", "--save-dir",
         tmp_path / "ft"])
    after = torch.load(tmp_path / "ft" / "checkpoint_last.pt", weights_only=True)["model"]
    start, _ = load_qnz(tmp_path / "hub" / "m.qnz")
    for key in ("decoder.layers.0.fc1.weight", "decoder.embed_tokens.weight", "decoder.layers.1.final_layer_norm.weight"):
        assert (after[key] - start[key]).abs().max() < 1e-4, key
