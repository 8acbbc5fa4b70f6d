"""iPQ in fairseq with the plugin, cases issue 13 found broken: a post-hoc quantized RoBERTa
(positional embeddings), staged iPQ of tied embeddings, fairseq's fp32-copy fp16 optimizer, and the
optimizer step hook's bookkeeping."""
import gc
import shutil
import subprocess
import sys
import weakref
from argparse import Namespace

import pytest
import torch
from torch import nn

from conftest import TINY_LM, USER_DIR, run, train_tiny_lm

QN = [sys.executable, "-m", "quantnoise.cli"]
PLAN = """seed: 0
stages:
  - {pattern: 'fc[12]', block_size: 8, n_centroids: 16, updates: 2}
  - {pattern: 'embed_tokens|output_projection', block_size: 8, n_centroids: 16, updates: 3}
"""


def plugin():
    from fairseq import utils

    utils.import_user_module(Namespace(user_dir=USER_DIR))
    import qn_fairseq.ipq

    return qn_fairseq.ipq


@pytest.mark.slow
def test_post_hoc_quantized_roberta_loads_and_fine_tunes_with_the_plugin(lm_data, tmp_path):
    common = ["--optimizer", "adam", "--lr", "0.003", "--no-progress-bar", "--num-workers", "0", "--seed", "1",
              "--no-epoch-checkpoints", "--disable-validation", "--task", "masked_lm", "--criterion", "masked_lm",
              "--arch", "qn_roberta_tiny", "--tokens-per-sample", "32", "--max-tokens", "512"]
    run(["fairseq-train", lm_data, "--user-dir", USER_DIR, *common, "--max-update", "4", "--save-dir", tmp_path / "ck"])
    (tmp_path / "q").mkdir()
    run([*QN, "quantize", tmp_path / "ck" / "checkpoint_last.pt", "-o", tmp_path / "q" / "checkpoint_last.pt",
         "--block-size", "4", "--centroids", "16"])  # default pattern '.': positional embeddings too
    # the reference: stock RoBERTa with every weight decoded (codebook[codes]) in fp32
    from quantnoise.checkpoint import stock_checkpoint

    q = torch.load(tmp_path / "q" / "checkpoint_last.pt", weights_only=False)
    decoded = {k: v for k, v in q["model"].items() if not k.endswith((".codes", ".centroids", ".weight_size"))}
    for k in q["model"]:
        if k.endswith(".codes"):
            layer = k[: -len(".codes")]
            cents, size = q["model"][f"{layer}.centroids"], q["model"][f"{layer}.weight_size"].tolist()
            decoded[f"{layer}.weight"] = cents[q["model"][k].long()].reshape(size)
    (tmp_path / "plain").mkdir()
    torch.save(stock_checkpoint(decoded, {"fairseq": {"cfg": q["cfg"]}}), tmp_path / "plain" / "checkpoint_last.pt")
    code = (
        "import sys, torch\n"
        "from argparse import Namespace\n"
        "from fairseq import utils\n"
        "from fairseq.models.roberta import RobertaModel\n"
        "utils.import_user_module(Namespace(user_dir=sys.argv[4]))\n"
        "q = RobertaModel.from_pretrained(sys.argv[1], 'checkpoint_last.pt', sys.argv[3], bpe=None).eval()\n"
        "plain = RobertaModel.from_pretrained(sys.argv[2], 'checkpoint_last.pt', sys.argv[3], bpe=None).eval()\n"
        "pos = q.model.encoder.sentence_encoder.embed_positions\n"
        "print(type(pos).__name__, pos.max_positions, type(plain.model).__name__)\n"
        "x = torch.tensor([[0, 10, 11, 12, 2]])\n"
        "a, b = q.extract_features(x), plain.extract_features(x)\n"
        "print('max diff', float((a - b).abs().max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q"), str(tmp_path / "plain"), str(lm_data),
                          USER_DIR], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    # the plugin's PQ model computes what stock fairseq computes with the decoded weights
    assert "PQLearnedPositionalEmbedding 32 RobertaModel" in out.stdout, out.stdout
    assert float(out.stdout.split("max diff")[1]) < 1e-4, out.stdout
    # and fairseq-train fine-tunes it
    run(["fairseq-train", lm_data, "--user-dir", USER_DIR, *common, "--max-update", "2", "--save-dir", tmp_path / "ft",
         "--restore-file", tmp_path / "q" / "checkpoint_last.pt", "--reset-optimizer", "--reset-dataloader",
         "--reset-lr-scheduler", "--reset-meters"])
    before = q["model"]
    after = torch.load(tmp_path / "ft" / "checkpoint_last.pt", weights_only=False)["model"]  # our own file
    key = "encoder.sentence_encoder.embed_positions"
    assert torch.equal(before[f"{key}.codes"], after[f"{key}.codes"])
    assert not torch.equal(before[f"{key}.centroids"], after[f"{key}.centroids"])


@pytest.mark.slow
def test_staged_ipq_keeps_a_tied_embedding_and_output_projection_on_one_codebook(lm_data, tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN)
    out = train_tiny_lm(lm_data, tmp_path / "ck", "--share-decoder-input-output-embed",
                        "--ipq-plan", tmp_path / "plan.yaml", updates=6)
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)["model"]
    emb, proj = "decoder.embed_tokens", "decoder.output_projection"
    assert torch.equal(state[f"{emb}.codes"], state[f"{proj}.codes"])
    assert torch.equal(state[f"{emb}.centroids"], state[f"{proj}.centroids"])  # still tied after 4 updates
    assert "one shared codebook" in out.stderr + out.stdout
    # loading keeps one codebook too, and so does resuming from the checkpoint
    from fairseq import checkpoint_utils

    plugin()
    (model,), _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "ck" / "checkpoint_last.pt")])
    assert model.decoder.embed_tokens.centroids is model.decoder.output_projection.centroids
    assert torch.equal(model.decoder.embed_tokens.centroids.detach(), state[f"{emb}.centroids"])


ROBERTA_PLAN = """seed: 0
stages:
  - {pattern: 'fc[12]', block_size: 8, n_centroids: 16, updates: 2}
  - {pattern: 'embed_tokens', block_size: 8, n_centroids: 16, updates: 2}
  - {pattern: '_proj', block_size: 8, n_centroids: 16, updates: 2}
"""


@pytest.mark.slow
def test_staged_ipq_of_roberta_keeps_the_lm_head_tied_through_resume_export_and_runtime(lm_data, tmp_path):
    """RoBERTa's LM head holds the embedding's weight as a bare Parameter (no Linear): after the embedding's
    stage it reads the decoded weight (issue 23 A: it kept an fp32 copy, trained apart, 3.5 MB in the .qnz)."""
    (tmp_path / "plan.yaml").write_text(ROBERTA_PLAN)
    common = ["--optimizer", "adam", "--lr", "0.003", "--no-progress-bar", "--num-workers", "0", "--seed", "1",
              "--no-epoch-checkpoints", "--disable-validation", "--task", "masked_lm", "--criterion", "masked_lm",
              "--arch", "qn_roberta_tiny", "--tokens-per-sample", "32", "--max-tokens", "512",
              "--ipq-plan", tmp_path / "plan.yaml", "--save-interval-updates", "3", "--max-update", "6"]
    out = run(["fairseq-train", lm_data, "--user-dir", USER_DIR, *common, "--save-dir", tmp_path / "full"])
    log = out.stderr + out.stdout
    assert "encoder.lm_head read(s) its decoded weight" in log and "full-precision copy" not in log, log[-3000:]
    emb, head = "encoder.sentence_encoder.embed_tokens", "encoder.lm_head"
    ck = torch.load(tmp_path / "full" / "checkpoint_last.pt", weights_only=False)
    state = ck["model"]
    decoded = state[f"{emb}.centroids"][state[f"{emb}.codes"].long()].reshape(state[f"{emb}.weight_size"].tolist())
    assert torch.equal(state[f"{head}.weight"], decoded)  # the head's weight is the codebook's, trained with it
    # the optimizer holds each parameter of the model once (the replaced embedding weight was dropped)
    plugin()
    from fairseq import checkpoint_utils

    (model,), _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "full" / "checkpoint_last.pt")])
    assert type(model.encoder.lm_head).__name__ == "TiedRobertaLMHead"
    assert f"{head}.weight" not in dict(model.named_parameters())
    held = [p for g in ck["last_optimizer_state"]["param_groups"] for p in g["params"]]
    assert len(held) == len(set(held)) == len(list(model.parameters()))
    # resuming from the mid-plan checkpoint (embedding compressed, _proj pending) ends where the full run does
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint_1_3.pt", tmp_path / "resumed" / "checkpoint_last.pt")
    run(["fairseq-train", lm_data, "--user-dir", USER_DIR, *common, "--save-dir", tmp_path / "resumed"])
    a, b = state, torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the .qnz stores the head's weight as an alias of the codebook and loads compressed = decoded
    run([*QN, "export", tmp_path / "full" / "checkpoint_last.pt", "-o", tmp_path / "m.qnz"])
    from quantnoise import export, runtime

    _, meta = export.read_qnz(tmp_path / "m.qnz")
    assert meta["aliases"] == {f"{head}.weight": emb} and f"{head}.weight" not in meta["dense"]
    compressed, _, task = runtime.load_fairseq(tmp_path / "m.qnz", data=lm_data)
    plain, _, _ = runtime.load_fairseq(tmp_path / "m.qnz", data=lm_data, decoded=True)
    assert type(compressed.encoder.lm_head).__name__ == "RuntimeLMHead"
    toks = torch.randint(4, len(task.source_dictionary), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compressed(toks)[0], plain(toks)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_fp32_copy_fp16_optimizer_is_refused_and_memory_efficient_fp16_trains(lm_data, tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN)
    flags = ["--cpu", "--ipq-plan", tmp_path / "plan.yaml"]
    out = run(["fairseq-train", lm_data, "--user-dir", USER_DIR, *TINY_LM, "--max-update", "6", "--save-dir",
               tmp_path / "a", *flags, "--fp16", "--fp16-no-flatten-grads"], check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "cannot run under fairseq's --fp16" in last and "--memory-efficient-fp16" in last, last
    train_tiny_lm(lm_data, tmp_path / "b", *flags, "--memory-efficient-fp16", "--save-interval-updates", "3", updates=6)
    mid, end = (torch.load(tmp_path / "b" / f, weights_only=True)["model"] for f in ("checkpoint_1_3.pt", "checkpoint_last.pt"))
    key = "decoder.embed_tokens.centroids"  # swapped in at update 2: trains on from there
    assert key in mid and not torch.equal(mid[key], end[key])


class Chain(nn.Sequential):
    """nn.Sequential whose forward skips the parameter-less ``ipq`` child attach_ipq adds."""

    def forward(self, x):
        for name, layer in self.named_children():
            x = x if name == "ipq" else layer(x)
        return x


def test_step_hook_touches_only_its_models_optimizer_and_holds_no_dropped_weight(tmp_path):
    ipq = plugin()
    from quantnoise.compress.layers import PQLinear

    (tmp_path / "plan.yaml").write_text("stages:\n  - {pattern: '^0$', block_size: 4, n_centroids: 4}\n")
    torch.manual_seed(0)
    model = ipq.attach_ipq(Chain(nn.Linear(8, 8), nn.Linear(8, 2)), Namespace(ipq_plan=str(tmp_path / "plan.yaml")))
    unrelated = nn.Linear(8, 8)
    other = torch.optim.SGD(unrelated.parameters(), lr=0.1)
    mine = torch.optim.SGD(model.parameters(), lr=0.1)
    old = weakref.ref(model[0].weight)
    model(torch.randn(3, 8)).sum().backward()  # first training forward: stage 0 swaps layer 0
    unrelated(torch.randn(2, 8)).sum().backward()
    assert isinstance(model[0], PQLinear)
    other.step()
    assert [p for g in other.param_groups for p in g["params"]] == list(unrelated.parameters())
    assert old() is not None and model.ipq.pending  # still in `mine`: swapped at its step
    mine.step()
    held = [p for g in mine.param_groups for p in g["params"]]
    assert held == list(model.parameters()) and not model.ipq.pending
    del held
    gc.collect()
    assert old() is None  # the replaced weight is released

    # a model whose optimizer never holds the replaced weight (no optimizer here) keeps nothing alive
    torch.manual_seed(0)
    alone = ipq.attach_ipq(Chain(nn.Linear(8, 8)), Namespace(ipq_plan=str(tmp_path / "plan.yaml")))
    old = weakref.ref(alone[0].weight)
    alone(torch.randn(3, 8))
    gc.collect()
    assert isinstance(alone[0], PQLinear) and old() is None
    other.step()  # the hook drops the dead entry
    assert not alone.ipq.pending


def test_a_swap_re_lists_legacy_ddp_parameters_and_c10d_is_refused_in_one_line(tmp_path):
    """In-process, world size 1: the wrapper fairseq builds learns the centroids a stage swap creates
    (the 2-rank runs in test_ipq_distributed.py show what goes wrong without)."""
    import torch.distributed as dist
    from fairseq import models
    from fairseq.distributed import LegacyDistributedDataParallel, ModuleProxyWrapper
    from torch.nn.parallel import DistributedDataParallel

    from test_plugin_distributed import free_port

    ipq = plugin()
    (tmp_path / "plan.yaml").write_text("stages:\n  - {pattern: '^0$', block_size: 4, n_centroids: 4}\n")
    plan = Namespace(ipq_plan=str(tmp_path / "plan.yaml"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = ipq.attach_ipq(Chain(nn.Linear(8, 8), nn.Linear(8, 2)), plan)
        wrapped = models.DistributedFairseqModel(Namespace(tpu=False, ddp_backend="legacy_ddp"), model,
                                                 dist.group.WORLD, torch.device("cpu"))
        assert isinstance(wrapped.module, LegacyDistributedDataParallel)
        wrapped(torch.randn(3, 8))  # the stage swap
        listed = [p for ps in wrapped.module.per_device_params for p in ps]
        assert any(p is model[0].centroids for p in listed)
        assert {id(p) for p in listed} == {id(p) for p in model.parameters()}

        model = ipq.attach_ipq(Chain(nn.Linear(8, 8), nn.Linear(8, 2)), plan)
        wrapped = ModuleProxyWrapper(DistributedDataParallel(model))  # what --ddp-backend c10d builds (on GPU)
        model.ipq.wrapper = weakref.ref(wrapped)
        with pytest.raises(SystemExit, match="use --ddp-backend legacy_ddp") as e:
            wrapped(torch.randn(3, 8))
        assert "\n" not in str(e.value) and "DistributedDataParallel" in str(e.value)
    finally:
        dist.destroy_process_group()
