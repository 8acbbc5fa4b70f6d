"""Data builders and checks shared by the plugin tests (fixtures themselves live in the test files,
since a second conftest.py would clash with tests/conftest.py under pytest's default import mode)."""
from __future__ import annotations

import math
import pathlib
import random
import re

from conftest import USER_DIR, run

FLOAT = r"([0-9.]+|nan|inf)"


def reversal_corpus(out: pathlib.Path) -> pathlib.Path:
    """A tiny src->tgt parallel corpus (the target is the source reversed), binarised jointly."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(20)]
    for split, n in (("train", 400), ("valid", 32), ("test", 16)):
        src = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        (out / f"{split}.src").write_text("\n".join(src) + "\n")
        (out / f"{split}.tgt").write_text("\n".join(" ".join(s.split()[::-1]) for s in src) + "\n")
    run(["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
         "--trainpref", out / "train", "--validpref", out / "valid", "--testpref", out / "test",
         "--destdir", out / "bin", "--workers", "1"])
    return out / "bin"


def classification_corpus(lm_data: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """sentence_prediction data from the LM corpus text: label = sentence longer than the median."""
    text = lm_data.parent / "txt"
    for split in ("train", "valid"):
        lines = (text / f"{split}.txt").read_text().splitlines()
        median = sorted(len(l.split()) for l in lines)[len(lines) // 2]
        (out / f"{split}.input0").write_text("\n".join(lines) + "\n")
        (out / f"{split}.label").write_text("\n".join("long" if len(l.split()) > median else "short"
                                                      for l in lines) + "\n")
    for field, extra in (("input0", ["--srcdict", lm_data / "dict.txt"]), ("label", [])):
        run(["fairseq-preprocess", "--only-source", "--trainpref", out / f"train.{field}",
             "--validpref", out / f"valid.{field}", "--destdir", out / "bin" / field, "--workers", "1", *extra])
    return out / "bin"


def train_losses(log: str) -> list:
    """The ``loss=`` values of fairseq's train_inner log lines, in order."""
    return [float(x) for x in re.findall(r"train_inner \|.*? loss=" + FLOAT, log)]


def assert_finite_and_trained(proc, updates: int) -> None:
    log = proc.stdout + proc.stderr
    losses = train_losses(log)
    assert losses, f"no train_inner loss lines in the log:\n{log[-2000:]}"
    assert all(math.isfinite(x) for x in losses), losses
    assert f"num_updates: {updates} >= max_update: {updates}" in log, log[-2000:]


def load_into_plain(ckpt: pathlib.Path, plain_arch: str):
    """Build the *plain* fairseq architecture from the checkpoint's config and load its weights
    with strict=True: same parameter names and shapes, no extra modules.  Returns the model."""
    from argparse import Namespace

    from fairseq import checkpoint_utils, tasks, utils
    from omegaconf import OmegaConf

    utils.import_user_module(Namespace(user_dir=USER_DIR))  # torch.load allowlist for Namespace args
    state = checkpoint_utils.load_checkpoint_to_cpu(str(ckpt))
    cfg = state["cfg"]
    task = tasks.setup_task(cfg.task)
    from qn_fairseq.args import QuantNoiseArgs  # importable once the user dir is

    ours = set(QuantNoiseArgs.__dataclass_fields__)  # the plain model's schema has no such fields
    fields = vars(cfg.model) if isinstance(cfg.model, Namespace) else OmegaConf.to_container(cfg.model)
    fields = {k: v for k, v in fields.items() if k not in ours} | {"_name": plain_arch}
    if isinstance(cfg.model, Namespace):
        model_cfg = Namespace(**{**fields, "arch": plain_arch})
    else:
        model_cfg = OmegaConf.create(fields)
    model = task.build_model(model_cfg)
    from quantnoise.api import wrapped_layers

    assert not wrapped_layers(model), "the plain architecture must not contain quant-noise wrappers"
    model.load_state_dict(state["model"], strict=True)
    return model
