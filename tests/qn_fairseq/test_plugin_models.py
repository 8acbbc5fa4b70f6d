"""The three plugin architectures trained by the real ``fairseq-train`` with each scheme, loaded by
the real evaluation tools, and loaded (strictly) into the plain fairseq architecture."""
from __future__ import annotations

import math
import re

import pytest

from conftest import TINY_LM, USER_DIR, run, train_tiny_lm
from qn_helpers import (FLOAT, assert_finite_and_trained, classification_corpus, load_into_plain,
                        reversal_corpus, train_losses)

pytestmark = pytest.mark.slow

# small codebooks/blocks so pq has enough blocks per layer in 64-dim models
SCHEMES = {
    "drop": ["--quant-noise-scheme", "drop", "--quant-noise-p", "0.1"],
    "scalar": ["--quant-noise-scheme", "scalar", "--quant-noise-p", "0.2", "--quant-noise-bits", "4"],
    "pq": ["--quant-noise-scheme", "pq", "--quant-noise-p", "0.2", "--quant-noise-block-size", "4",
           "--quant-noise-centroids", "16", "--quant-noise-refresh-every", "10"],
}
COMMON = ["--optimizer", "adam", "--lr", "0.003", "--no-progress-bar", "--log-format", "simple",
          "--log-interval", "5", "--num-workers", "0", "--seed", "1", "--no-epoch-checkpoints"]


def wrapped_count(log: str) -> int:
    m = re.search(r"quant-noise (\w+) p=[0-9.]+ on (\d+) layers", log)
    assert m, "the plugin did not log its wrapped layers"
    return int(m.group(2))


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory):
    return reversal_corpus(tmp_path_factory.mktemp("mt"))


@pytest.fixture(scope="module")
def cls_data(lm_data, tmp_path_factory):
    return classification_corpus(lm_data, tmp_path_factory.mktemp("cls"))


# --------------------------------------------------------------------------------- language model
@pytest.mark.parametrize("scheme", SCHEMES)
def test_lm_trains_loss_falls_and_evaluates(scheme, lm_data, tmp_path):
    proc = train_tiny_lm(lm_data, tmp_path, *SCHEMES[scheme], "--log-interval", "5", updates=30)
    assert_finite_and_trained(proc, 30)
    losses = train_losses(proc.stdout + proc.stderr)
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses}"
    assert wrapped_count(proc.stdout + proc.stderr) == 2 * 6 + 2  # 2 layers x (q,k,v,out,fc1,fc2) + emb + out

    ev = run(["fairseq-eval-lm", lm_data, "--path", tmp_path / "checkpoint_last.pt", "--user-dir", USER_DIR,
              "--tokens-per-sample", "32", "--max-tokens", "512", "--num-workers", "0", "--gen-subset", "valid"])
    ppl = float(re.search(r"Perplexity: " + FLOAT, ev.stdout + ev.stderr).group(1))
    # fairseq's losses are base 2.  Measured (seed 1, 30 updates): train loss 10.5 -> 8.0, valid 7.6-7.7 bits
    # for every scheme.  The evaluated model must have learnt (>= 2 bits, 4x in perplexity, below the
    # start) and evaluate like the model that trained (noise off in eval: not worse than the last
    # training loss, which was measured with noise on, plus half a bit)
    assert math.isfinite(ppl) and math.log2(ppl) < losses[0] - 2.0, (ppl, losses)
    assert math.log2(ppl) < losses[-1] + 0.5, (ppl, losses)
    load_into_plain(tmp_path / "checkpoint_last.pt", "transformer_lm")


def test_fairseq_own_flags_are_served_by_our_wrappers(lm_data, tmp_path):
    """--quant-noise-pq P --quant-noise-pq-block-size B = our drop; no fairseq hook, no extra Linear."""
    proc = train_tiny_lm(lm_data, tmp_path, "--quant-noise-pq", "0.1", "--quant-noise-pq-block-size", "4",
                         updates=2)
    log = proc.stdout + proc.stderr
    assert re.search(r"quant-noise drop p=0.1 on \d+ layers", log)
    assert "quant_noise=drop(p=0.1, block=4)" in log
    load_into_plain(tmp_path / "checkpoint_last.pt", "transformer_lm")  # strict: no extra parameters

    proc = train_tiny_lm(lm_data, tmp_path / "s", "--quant-noise-scalar", "0.2", updates=1)
    assert "quant_noise=scalar(p=0.2, block=8, bits=8" in proc.stdout + proc.stderr


BAD = {
    "p": (["--quant-noise-p", "1.5"], "--quant-noise-p=1.5"),
    "drop_p1": (["--quant-noise-p", "1.0"], "--quant-noise-p=1.0"),
    "bits": (["--quant-noise-scheme", "scalar", "--quant-noise-p", "0.1", "--quant-noise-bits", "9"],
             "--quant-noise-bits=9"),
    "block": (["--quant-noise-p", "0.1", "--quant-noise-block-size", "7"], "--quant-noise-block-size=7"),
    "scheme": (["--quant-noise-scheme", "int3", "--quant-noise-p", "0.1"], "--quant-noise-scheme"),
    "pattern": (["--quant-noise-p", "0.1", "--quant-noise-layers", "no_such_layer"],
                "--quant-noise-layers='no_such_layer'"),
    "plan_missing": (["--ipq-plan", "/nonexistent/plan.yaml"], "ipq plan /nonexistent/plan.yaml does not exist"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_flag_stops_before_first_update_with_one_line(case, lm_data, tmp_path):
    flags, named = BAD[case]
    proc = run(["fairseq-train", lm_data, "--user-dir", USER_DIR, *TINY_LM, "--max-update", "5",
                "--save-dir", tmp_path, *flags], check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert named in err[-1] and "error" in err[-1], err[-3:]
    assert "num_updates" not in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("*.pt"))


# ----------------------------------------------------------------------------------- translation
MT = ["--task", "translation", "--arch", "qn_transformer_tiny", "--share-all-embeddings",
      "--criterion", "label_smoothed_cross_entropy", "--max-tokens", "1024", "--disable-validation", *COMMON]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_translation_trains_and_generates(scheme, mt_data, tmp_path):
    proc = run(["fairseq-train", mt_data, "--user-dir", USER_DIR, *MT, *SCHEMES[scheme],
                "--max-update", "15", "--save-dir", tmp_path])
    assert_finite_and_trained(proc, 15)
    # encoder/decoder: 2x(4+2) + 2x(4+4+2) linear layers, the shared embedding, the output projection
    assert wrapped_count(proc.stdout + proc.stderr) == 12 + 20 + 1 + 1
    ckpt = tmp_path / "checkpoint_last.pt"
    model = load_into_plain(ckpt, "transformer")
    assert model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight

    gen = run(["fairseq-generate", mt_data, "--user-dir", USER_DIR, "--path", ckpt, "--beam", "2",
               "--max-len-a", "1", "--max-len-b", "2", "--max-tokens", "1024", "--num-workers", "0"])
    hyps = [l for l in gen.stdout.splitlines() if l.startswith("H-")]
    assert len(hyps) == 16  # every test sentence translated
    if scheme == "pq":
        (tmp_path / "in.txt").write_text("w1 w2 w3\n")
        inter = run(["fairseq-interactive", mt_data, "--user-dir", USER_DIR, "--path", ckpt, "--beam", "2",
                     "--source-lang", "src", "--target-lang", "tgt", "--max-len-b", "4", "--input", tmp_path / "in.txt"])
        assert [l for l in inter.stdout.splitlines() if l.startswith("H-0")]


# -------------------------------------------------------------------------------------- RoBERTa
ROBERTA = ["--arch", "qn_roberta_tiny", "--max-tokens", "512", "--disable-validation", *COMMON]


def from_pretrained(ckpt_dir, data_dir):
    from fairseq.models.roberta import RobertaModel

    return RobertaModel.from_pretrained(str(ckpt_dir), "checkpoint_last.pt", str(data_dir), user_dir=USER_DIR,
                                        bpe=None)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_roberta_masked_lm_trains_and_loads(scheme, lm_data, tmp_path):
    import torch

    from quantnoise.api import wrapped_layers

    proc = run(["fairseq-train", lm_data, "--user-dir", USER_DIR, "--task", "masked_lm", "--criterion",
                "masked_lm", "--tokens-per-sample", "32", *ROBERTA, *SCHEMES[scheme], "--max-update", "10",
                "--save-dir", tmp_path])
    assert_finite_and_trained(proc, 10)
    load_into_plain(tmp_path / "checkpoint_last.pt", "roberta")
    hub = from_pretrained(tmp_path, lm_data)
    assert type(hub.model).__name__ == "QNRobertaModel"
    assert len(wrapped_layers(hub.model)) == wrapped_count(proc.stdout + proc.stderr)
    feats = hub.extract_features(torch.tensor([[0, 10, 11, 12, 2]]))
    assert feats.shape == (1, 5, 64) and torch.isfinite(feats).all()


def test_roberta_sentence_prediction_noises_head_and_loads(cls_data, tmp_path):
    import torch

    proc = run(["fairseq-train", cls_data, "--user-dir", USER_DIR, "--task", "sentence_prediction",
                "--criterion", "sentence_prediction", "--num-classes", "2", "--max-positions", "64",
                "--init-token", "0", "--separator-token", "2", "--shorten-method", "truncate", *ROBERTA,
                *SCHEMES["pq"], "--max-update", "10", "--save-dir", tmp_path])
    assert_finite_and_trained(proc, 10)
    log = proc.stdout + proc.stderr
    assert re.search(r"\(out_proj\): QNLinear\(in_features=64, out_features=2", log), "head not noised"
    model = load_into_plain(tmp_path / "checkpoint_last.pt", "roberta")
    assert "sentence_classification_head" in model.classification_heads
    hub = from_pretrained(tmp_path, cls_data)
    head = hub.model.classification_heads["sentence_classification_head"]
    assert type(head.out_proj).__name__ == "QNLinear"
    logp = hub.predict("sentence_classification_head", torch.tensor([[0, 10, 11, 12, 2]]))
    assert logp.shape == (1, 2) and torch.allclose(logp.exp().sum(), torch.tensor(1.0))
