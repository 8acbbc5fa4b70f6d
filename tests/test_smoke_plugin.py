import pytest

from conftest import run, USER_DIR


@pytest.mark.slow
def test_tiny_lm_checkpoint_evaluates(tiny_lm_ckpt, lm_data):
    out = run(["fairseq-eval-lm", lm_data, "--path", tiny_lm_ckpt, "--user-dir", USER_DIR,
               "--tokens-per-sample", "32", "--max-tokens", "512", "--num-workers", "0"])
    assert "Perplexity" in out.stderr + out.stdout
