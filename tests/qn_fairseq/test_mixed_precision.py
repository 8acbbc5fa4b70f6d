"""fairseq's mixed-precision modes with the plugin (issue 12): real fairseq-train / fairseq-hydra-train
runs of the tiny LM, then fairseq-eval-lm on the checkpoints; iPQ, fine-tuning and .qnz export from
a half-precision checkpoint.

What fairseq 0.12 runs on CPU (see docs/fairseq_plugin.md, "Mixed precision"):
  --fp16 --fp16-no-flatten-grads   yes (fp16 model, fp32 master copy, loss scaling)
  --fp16 (flattened master copy)   no: FP16Optimizer calls torch.cuda.current_device()
  --memory-efficient-fp16          yes
  --amp                            runs, but torch.cuda.amp.autocast is off on CPU: an fp32 run
  --bf16                           no on the command line (it implies --tpu); yes through
                                   fairseq-hydra-train with common.bf16=true common.cpu=true
fairseq saves fp16 / bf16 models as fp32 (utils.move_to_cpu); a half-precision checkpoint (e.g. one
distributed in fp16 to halve its size) is made here by casting one.
Every run uses --sample-break-mode eos, so batches hold padding (the all-zero embedding row that
turned scalar noise into NaN in fp16).
"""
import math
import re
import sys

import pytest
import torch

from conftest import ROOT, TINY_LM, USER_DIR, run, train_tiny_lm
from qn_helpers import assert_finite_and_trained, train_losses

PAD = ["--sample-break-mode", "eos"]
FP16_CPU = ["--cpu", "--fp16", "--fp16-no-flatten-grads", *PAD]
SCHEME = {"drop": ["--quant-noise-scheme", "drop", "--quant-noise-p", "0.2"],
          "scalar": ["--quant-noise-scheme", "scalar", "--quant-noise-p", "0.5", "--quant-noise-bits", "4"],
          "pq": ["--quant-noise-scheme", "pq", "--quant-noise-p", "0.5", "--quant-noise-centroids", "16",
                 "--quant-noise-refresh-every", "3"]}  # several codebook refreshes from fp16 weights
EVAL = ["--tokens-per-sample", "32", "--max-tokens", "512", "--num-workers", "0", "--cpu"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def qn(*args, check=True):
    return run([sys.executable, "-m", "quantnoise.cli", *args], check=check)


def eval_ppl(data, path, *extra) -> float:
    out = run(["fairseq-eval-lm", data, "--path", path, "--user-dir", USER_DIR, *EVAL, *extra])
    m = re.search(r"Perplexity: ([0-9.]+|nan|inf)", out.stderr + out.stdout)
    assert m, (out.stderr + out.stdout)[-2000:]
    ppl = float(m.group(1))
    assert math.isfinite(ppl), out.stderr[-2000:]
    return ppl


def weight_dtypes(ckpt) -> set:
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["model"]
    return {t.dtype for k, t in state.items() if k.endswith((".weight", ".centroids")) and t.is_floating_point()}


def trained(proc, updates):
    assert_finite_and_trained(proc, updates)
    losses = train_losses(proc.stdout + proc.stderr)
    assert losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def fp16_ckpt(lm_data, tmp_path_factory):
    """The tiny LM trained 8 updates with scalar noise under --fp16 on CPU."""
    save = tmp_path_factory.mktemp("fp16")
    proc = train_tiny_lm(lm_data, save, *FP16_CPU, *SCHEME["scalar"], "--log-interval", "2", updates=8)
    trained(proc, 8)
    return save / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def half_ckpt(fp16_ckpt):
    """``fp16_ckpt`` with every float tensor of the model stored in fp16."""
    state = torch.load(fp16_ckpt, weights_only=False)
    state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    path = fp16_ckpt.parent / "half.pt"
    torch.save(state, path)
    return path


def test_fp16_cpu_scalar_noise_then_int8_ipq_of_the_fp16_checkpoint(fp16_ckpt, half_ckpt, lm_data, tmp_path):
    """Scalar noise under --fp16 (the fixture: finite, falling loss with padding in every batch);
    int8 quantization of the checkpoint in fp16; both evaluate in fp16 to nearly the same perplexity."""
    assert weight_dtypes(fp16_ckpt) == {torch.float32}  # fairseq stores the fp16 model as fp32
    qn("quantize", half_ckpt, "-o", tmp_path / "q8.pt", "--scheme", "scalar", "--bits", "8")
    ppl_fp16 = eval_ppl(lm_data, fp16_ckpt, "--fp16")
    assert eval_ppl(lm_data, tmp_path / "q8.pt", "--fp16") == pytest.approx(ppl_fp16, rel=0.05) and ppl_fp16 < 1e4


@pytest.mark.slow
def test_fp16_cpu_drop_noise(lm_data, tmp_path):
    trained(train_tiny_lm(lm_data, tmp_path, *FP16_CPU, *SCHEME["drop"], "--log-interval", "2", updates=8), 8)


@pytest.mark.slow
def test_memory_efficient_fp16_cpu_pq_noise(lm_data, tmp_path):
    """pq noise on an fp16 model (the same model dtype as --fp16): codebooks refreshed from fp16
    weights every 3 forwards."""
    proc = train_tiny_lm(lm_data, tmp_path, "--cpu", "--memory-efficient-fp16", *PAD, *SCHEME["pq"],
                         "--log-interval", "2", updates=8)
    trained(proc, 8)


@pytest.mark.slow
def test_amp_on_cpu_runs_in_fp32(lm_data, tmp_path):
    """fairseq's --amp uses torch.cuda.amp.autocast, which is off on CPU: the run is fp32 with
    fairseq's AMP loss scaler."""
    proc = train_tiny_lm(lm_data, tmp_path, "--cpu", "--amp", *PAD, *SCHEME["scalar"], "--log-interval", "2", updates=6)
    trained(proc, 6)


def hydra_train(data, out, *overrides):
    return run(["fairseq-hydra-train", "--config-dir", ROOT / "configs", "--config-name", "lm_tiny",
                f"task.data={data}", f"common.user_dir={USER_DIR}", f"hydra.run.dir={out}", "common.log_interval=2",
                "task.tokens_per_sample=32", "+task.sample_break_mode=eos", "dataset.max_tokens=512",
                "dataset.validate_interval_updates=0", "dataset.disable_validation=true",
                "optimization.max_update=6", "lr_scheduler.warmup_updates=2", *overrides])


def test_bf16_cpu_through_hydra(lm_data, tmp_path):
    """--bf16 on the command line implies --tpu in fairseq 0.12; common.bf16=true through Hydra
    trains a bf16 model on CPU."""
    proc = hydra_train(lm_data, tmp_path, "common.bf16=true", "common.cpu=true", "quant_noise=scalar_int8",
                       "model.quant_noise_p=0.5")
    log = (tmp_path / "hydra_train.log").read_text()
    losses = [float(x) for x in re.findall(r"train_inner\]\[INFO\] - .*? loss=([0-9.]+|nan|inf)", log)]
    assert losses and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], log[-2000:]
    ckpt = tmp_path / "checkpoints" / "checkpoint_last.pt"
    assert torch.load(ckpt, weights_only=False)["cfg"]["common"]["bf16"] is True, proc.stderr[-1000:]
    assert eval_ppl(lm_data, ckpt) < 1e4


def test_ipq_finetune_and_qnz_from_fp16_checkpoint(half_ckpt, lm_data, tmp_path):
    """quantnoise quantize of an fp16 checkpoint, its .qnz export, and --restore-file of it under
    --fp16 (the PQ layers are built in fp16, issue 13.8: they were CPU fp32 layers inside the fp16
    model, and the first forward failed); fairseq-eval-lm on each."""
    qn("quantize", half_ckpt, "-o", tmp_path / "q.pt", "--centroids", "32", "--exclude", "embed_tokens|output_proj")
    assert weight_dtypes(tmp_path / "q.pt") == {torch.float16}
    ppl_q = eval_ppl(lm_data, tmp_path / "q.pt", "--fp16")
    qn("export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz")
    assert eval_ppl(lm_data, tmp_path / "m.qnz", "--fp16") == pytest.approx(ppl_q, rel=1e-3)
    proc = train_tiny_lm(lm_data, tmp_path / "ft", "--restore-file", tmp_path / "q.pt", "--reset-optimizer",
                         "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters", *FP16_CPU,
                         "--log-interval", "1", updates=3)
    assert_finite_and_trained(proc, 3)
    before = torch.load(tmp_path / "q.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "ft" / "checkpoint_last.pt", weights_only=True)["model"]
    key = "decoder.layers.0.fc1.centroids"
    assert not torch.equal(before[key].float(), after[key].float())  # centroids trained
    assert ppl_q < 1e4


def test_non_finite_weight_stops_training_naming_layer_and_step(half_ckpt, lm_data, tmp_path):
    state = torch.load(half_ckpt, weights_only=False)
    state["model"]["decoder.layers.1.fc2.weight"][0, :3] = 7e4  # above fp16's max: inf in fp16
    torch.save(state, tmp_path / "bad.pt")
    proc = run(["fairseq-train", lm_data, "--user-dir", USER_DIR, *TINY_LM, *FP16_CPU, *SCHEME["scalar"],
                "--restore-file", tmp_path / "bad.pt", "--save-dir", tmp_path / "out", "--max-update", "10"], check=False)
    assert proc.returncode != 0
    assert re.search(r"FloatingPointError: layer 'decoder.layers.1.fc2' .* has 3 NaN/inf weights at step \d+",
                     proc.stderr), proc.stderr[-3000:]


# ------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("scheme", ["drop", "scalar", "pq"])
@pytest.mark.parametrize("flags", [["--fp16"], ["--amp"], ["--memory-efficient-fp16"]], ids=lambda f: f[0][2:])
def test_cuda_mixed_precision_each_scheme(flags, scheme, lm_data, tmp_path):
    proc = train_tiny_lm(lm_data, tmp_path, *flags, *PAD, *SCHEME[scheme], "--log-interval", "2", updates=8)
    trained(proc, 8)
    ckpt = tmp_path / "checkpoint_last.pt"
    out = run(["fairseq-eval-lm", lm_data, "--path", ckpt, "--user-dir", USER_DIR, "--tokens-per-sample", "32",
               "--max-tokens", "512", "--num-workers", "0", *([] if flags == ["--amp"] else ["--fp16"])])
    assert re.search(r"Perplexity: [0-9.]+", out.stderr + out.stdout)


@cuda
def test_cuda_bf16_through_hydra(lm_data, tmp_path):
    hydra_train(lm_data, tmp_path, "common.bf16=true", "quant_noise=pq", "model.quant_noise_p=0.5")
    assert weight_dtypes(tmp_path / "checkpoints" / "checkpoint_last.pt") == {torch.bfloat16}


@cuda
def test_cuda_fp16_restore_of_quantized_checkpoint(half_ckpt, lm_data, tmp_path):
    """Issue 13.8 on a GPU: PQ layers adopted from the checkpoint live on CUDA in fp16."""
    qn("quantize", half_ckpt, "-o", tmp_path / "q.pt", "--centroids", "32")
    proc = train_tiny_lm(lm_data, tmp_path / "ft", "--restore-file", tmp_path / "q.pt", "--reset-optimizer",
                         "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters", "--fp16", *PAD,
                         "--log-interval", "2", updates=4)
    assert_finite_and_trained(proc, 4)
