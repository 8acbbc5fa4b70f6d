"""decompress gives checkpoints that *stock* fairseq loads without the plugin: translation through
fairseq-generate and RoBERTa through RobertaModel.from_pretrained (the LM path is in test_ipq_e2e)."""
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
    gen = run(["fairseq-generate", data, "--path", plain, "--beam", "2", "--max-len-a", "1", "--max-len-b", "2",
               "--max-tokens", "1024", "--num-workers", "0"])  # no --user-dir
    assert len([l for l in gen.stdout.splitlines() if l.startswith("H-")]) == 16


def test_roberta_decompressed_loads_in_stock_from_pretrained(lm_data, tmp_path):
    run(["fairseq-train", lm_data, "--user-dir", USER_DIR, "--task", "masked_lm", "--criterion", "masked_lm",
         "--arch", "qn_roberta_tiny", "--tokens-per-sample", "32", "--max-tokens", "512", *COMMON,
         "--max-update", "6", "--save-dir", tmp_path / "ck"])
    plain = compress_and_decompress(tmp_path / "ck" / "checkpoint_last.pt", tmp_path)
    code = (
        "import sys, torch\n"
        "from fairseq.models.roberta import RobertaModel\n"
        "hub = RobertaModel.from_pretrained(sys.argv[1], 'checkpoint_last.pt', sys.argv[2], bpe=None)\n"
        "f = hub.extract_features(torch.tensor([[0, 10, 11, 12, 2]]))\n"
        "assert type(hub.model).__name__ == 'RobertaModel' and torch.isfinite(f).all(), f\n"
        "print('ok', tuple(f.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(plain.parent), str(lm_data)], capture_output=True, text=True)
    assert out.returncode == 0 and "ok (1, 5, 64)" in out.stdout, out.stderr[-3000:]
