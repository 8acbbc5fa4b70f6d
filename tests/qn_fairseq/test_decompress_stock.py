"""decompress gives checkpoints that *stock* fairseq loads without the plugin: translation through
fairseq-generate and RoBERTa through RobertaModel.from_pretrained (the LM path is in test_ipq_e2e);
with the plugin, the same tools take the .qnz itself and give the same outputs."""
import subprocess
import sys

import pytest

from conftest import USER_DIR, run
from qn_helpers import reversal_corpus

pytestmark = pytest.mark.slow
COMMON = ["--optimizer", "adam", "--lr", "0.003", "--no-progress-bar", "--num-workers", "0", "--seed", "1",
          "--no-epoch-checkpoints", "--disable-validation", "--quant-noise-scheme", "drop", "--quant-noise-p", "0.1"]


def compress_and_decompress(ckpt, tmp_path):
    qn = [sys.executable, "-m", "quantnoise.cli"]
    run([*qn, "quantize", ckpt, "-o", tmp_path / "q.pt", "--scheme", "pq", "--block-size", "4", "--centroids", "16"])
    run([*qn, "export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz"])
    (tmp_path / "plain").mkdir()
    run([*qn, "decompress", tmp_path / "m.qnz", "-o", tmp_path / "plain" / "checkpoint_last.pt"])
    return tmp_path / "plain" / "checkpoint_last.pt"


def test_translation_decompressed_runs_in_stock_generate(tmp_path):
    data = reversal_corpus(tmp_path)
    run(["fairseq-train", data, "--user-dir", USER_DIR, "--task", "translation", "--arch", "qn_transformer_tiny",
         "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy", "--max-tokens", "1024",
         *COMMON, "--max-update", "8", "--save-dir", tmp_path / "ck"])
    plain = compress_and_decompress(tmp_path / "ck" / "checkpoint_last.pt", tmp_path)
    gen = ["fairseq-generate", data, "--beam", "2", "--max-len-a", "1", "--max-len-b", "2", "--max-tokens", "1024",
           "--num-workers", "0"]
    stock = run([*gen, "--path", plain])  # no --user-dir
    hyps = sorted(l for l in stock.stdout.splitlines() if l.startswith(("H-", "P-")))
    assert len([l for l in hyps if l.startswith("H-")]) == 16
    decoded = run([*gen, "--path", tmp_path / "m.qnz", "--user-dir", USER_DIR], env={"QUANTNOISE_QNZ_DECODE": "1"})
    assert sorted(l for l in decoded.stdout.splitlines() if l.startswith(("H-", "P-"))) == hyps  # same words, same scores
    # the default .qnz path runs the compressed layers (issue 10): same words, scores within float tolerance
    qnz = run([*gen, "--path", tmp_path / "m.qnz", "--user-dir", USER_DIR])
    got = sorted(l for l in qnz.stdout.splitlines() if l.startswith(("H-", "P-")))
    assert [l.split("\t")[0::2] for l in got] == [l.split("\t")[0::2] for l in hyps]  # ids and words
    scores = lambda lines: [float(v) for l in lines for v in l.split("\t")[1].split()]  # noqa: E731
    assert scores(got) == pytest.approx(scores(hyps), abs=1e-4)


def test_roberta_decompressed_loads_in_stock_from_pretrained(lm_data, tmp_path):
    run(["fairseq-train", lm_data, "--user-dir", USER_DIR, "--task", "masked_lm", "--criterion", "masked_lm",
         "--arch", "qn_roberta_tiny", "--tokens-per-sample", "32", "--max-tokens", "512", *COMMON,
         "--max-update", "6", "--save-dir", tmp_path / "ck"])
    plain = compress_and_decompress(tmp_path / "ck" / "checkpoint_last.pt", tmp_path)
    import shutil

    shutil.copy(tmp_path / "m.qnz", plain.parent / "model.qnz")
    code = (
        "import sys, torch\n"
        "from fairseq.models.roberta import RobertaModel\n"
        "hub = RobertaModel.from_pretrained(sys.argv[1], 'checkpoint_last.pt', sys.argv[2], bpe=None)\n"
        "hub.eval()  # from_pretrained leaves RoBERTa in training mode (dropout on)\n"
        "f = hub.extract_features(torch.tensor([[0, 10, 11, 12, 2]]))\n"
        "assert type(hub.model).__name__ == 'RobertaModel' and torch.isfinite(f).all(), f\n"
        "print('ok', tuple(f.shape))\n"
        "# then, with the plugin, the .qnz itself\n"
        "q = RobertaModel.from_pretrained(sys.argv[1], 'model.qnz', sys.argv[2], bpe=None, user_dir=sys.argv[3])\n"
        "q.eval()\n"
        "head, emb = q.model.encoder.lm_head, q.model.encoder.sentence_encoder.embed_tokens\n"
        "assert type(emb).__name__ == 'CodesEmbedding', emb  # compressed runtime layers (issue 10), and the tied\n"
        "assert head.proj.codes.data_ptr() == emb.codes.data_ptr(), head  # LM head reads the same codes, no copy\n"
        "pos = q.model.encoder.sentence_encoder.embed_positions  # learned positions: from their codes too\n"
        "assert type(pos).__name__ == 'RuntimeLearnedPositions' and type(pos.rows).__name__ == 'CodesEmbedding', pos\n"
        "x = torch.tensor([[0, 10, 11, 12, 2]])\n"
        "torch.testing.assert_close(q.model(x)[0], hub.model(x)[0], atol=1e-4, rtol=1e-4)  # masked-LM logits\n"
        "torch.testing.assert_close(q.extract_features(x), f, atol=1e-4, rtol=1e-4)\n"
        "print('qnz equal')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(plain.parent), str(lm_data), USER_DIR],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "ok (1, 5, 64)" in out.stdout and "qnz equal" in out.stdout, out.stderr[-3000:]
