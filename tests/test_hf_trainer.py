"""quantnoise.hf.QuantNoiseCallback with a real transformers.Trainer on a tiny GPT-2 built from a config."""
import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from quantnoise import IPQPlan, LayerRule, QuantNoiseConfig, quantize_  # noqa: E402
from quantnoise.compress import PQLinear  # noqa: E402
from quantnoise.hf import QuantNoiseCallback  # noqa: E402
from quantnoise.hf.conv1d import PQConv1D  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2(noise=True):
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(config)
    if noise:
        quantize_(model, QuantNoiseConfig(scheme="scalar", p=0.5, block_size=4, bits=4))
    return model


def train(model, out, callbacks, max_steps=6, resume=None, save_steps=3):
    args = tf.TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                                learning_rate=1e-2, save_strategy="steps", save_steps=save_steps, report_to=[],
                                logging_steps=100, seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                                save_only_model=False)
    trainer = tf.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_resume_draws_the_same_masks_and_ends_bit_identical(tmp_path):
    full = train(gpt2(), tmp_path / "a", [QuantNoiseCallback()])
    resumed = train(gpt2(), tmp_path / "b", [QuantNoiseCallback()], resume=str(tmp_path / "a" / "checkpoint-3"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # without the callback the masks follow the forward count, which restarts at 0 on resume: they differ
    bare = train(gpt2(), tmp_path / "c", [], save_steps=3)
    bare_resumed = train(gpt2(), tmp_path / "d", [], resume=str(tmp_path / "c" / "checkpoint-3"))
    assert any(not torch.equal(bare[k], bare_resumed[k]) for k in bare)


def test_staged_ipq_compresses_each_stage_and_trains_its_centroids(tmp_path, caplog):
    model = gpt2()
    plan = IPQPlan(stages=[LayerRule(pattern=r"mlp\.c_(fc|proj)", block_size=4, n_centroids=8, updates=2),
                           LayerRule(pattern=r"attn\.c_(attn|proj)|lm_head|wte", block_size=4, n_centroids=8,
                                     updates=2)], seed=1)
    seen = {}

    class Probe(tf.TrainerCallback):  # records the centroids as each step begins (after QuantNoiseCallback's)
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if "centroids" in n}

    with caplog.at_level("INFO", logger="quantnoise.hf.trainer"):
        train(model, tmp_path / "s", [QuantNoiseCallback(plan=plan, start=2), Probe()], max_steps=7, save_steps=100)
    assert "step 2: iPQ stage 0" in caplog.text and "step 4: iPQ stage 1" in caplog.text
    assert not seen[1] and set(seen[2]) == {f"transformer.h.{i}.mlp.{n}.centroids" for i in (0, 1) for n in ("c_fc", "c_proj")}
    assert isinstance(model.transformer.h[0].mlp.c_fc, PQConv1D) and isinstance(model.lm_head, PQLinear)
    assert model.lm_head.centroids is model.transformer.wte.centroids  # tied: one codebook
    assert len(seen[4]) == 4 + 4 + 1  # stage 1: attention projections + the tied embedding / head
    name = "transformer.h.0.mlp.c_fc.centroids"
    assert not torch.equal(seen[2][name], seen[4][name])  # the optimizer trains the new centroids
    name = "transformer.h.1.attn.c_attn.centroids"
    assert not torch.equal(seen[4][name], dict(model.named_parameters())[name].detach())
    model.eval().save_pretrained(tmp_path / "final")  # what Trainer.save_model calls: a quantnoise folder
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        want = model(ids).logits
        assert float((loaded(ids).logits - want).abs().max()) < 1e-3 * float(want.abs().max())
    assert type(loaded.transformer.h[0].mlp.c_fc).__name__ == "CodesConv1D"
    with pytest.raises(ValueError, match="plan must be an IPQPlan"):
        QuantNoiseCallback(plan=LayerRule())
