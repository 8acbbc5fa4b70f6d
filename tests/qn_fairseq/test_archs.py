"""Every ``qn_`` size variant the docs promise is registered and builds from its own arguments, with the
stock architecture's parameter names and shapes, and its layers wrapped.  Built on the ``meta``
device (no memory, no training), so even ``qn_transformer_lm_gpt3_175`` takes a second."""
from argparse import Namespace

import pytest

from conftest import USER_DIR

pytestmark = pytest.mark.slow

TASKS = {"transformer_lm": ["--task", "language_modeling"],
         "transformer": ["--task", "translation", "-s", "src", "-t", "tgt"],
         "roberta": ["--task", "masked_lm"]}
DOCUMENTED = ["qn_transformer_lm", "qn_transformer_lm_gpt", "qn_transformer_lm_gpt2_small", "qn_transformer_lm_big",
              "qn_transformer_lm_wiki103", "qn_transformer_lm_tiny", "qn_transformer", "qn_transformer_tiny",
              "qn_transformer_iwslt_de_en", "qn_transformer_wmt_en_de", "qn_transformer_vaswani_wmt_en_de_big",
              "qn_transformer_wmt_en_de_big", "qn_roberta", "qn_roberta_base", "qn_roberta_large",
              "qn_roberta_prenorm", "qn_xlm", "qn_roberta_tiny"]


def build(data, task_flags, arch, *flags):
    import torch
    from fairseq import options, tasks

    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [str(data), "--user-dir", USER_DIR, *task_flags, "--arch", arch, *flags])
    with torch.device("meta"):
        return tasks.setup_task(args).build_model(args)


def test_every_qn_size_variant_builds_like_its_stock_twin(tmp_path, monkeypatch):
    from fairseq import utils
    from fairseq.models import ARCH_MODEL_INV_REGISTRY
    from fairseq.models.roberta import model as roberta_model

    from quantnoise.api import wrapped_layers
    from quantnoise.checkpoint import STOCK_ARCH, stock_arch

    utils.import_user_module(Namespace(user_dir=USER_DIR))
    # fairseq's BERT init draws on a CPU copy of each weight, which a meta tensor has not (values are
    # irrelevant here: only structure is checked)
    monkeypatch.setattr(roberta_model, "init_bert_params", lambda module: None)
    words = "".join(f"w{i} 1\n" for i in range(70000))  # the wiki103 archs' adaptive softmax cuts at 60000
    for name in ("dict.txt", "dict.src.txt", "dict.tgt.txt"):
        (tmp_path / name).write_text(words)
    built = []
    for stock_model, task_flags in TASKS.items():
        ours = ARCH_MODEL_INV_REGISTRY[f"qn_{stock_model}"]
        assert {f"qn_{a}" for a in ARCH_MODEL_INV_REGISTRY[stock_model]} <= set(ours)  # every stock variant has a twin
        for arch in ours:
            noise = ["--quant-noise-scheme", "pq", "--quant-noise-p", "0.1", "--quant-noise-block-size", "4"]
            model = build(tmp_path, task_flags, arch, *noise)
            plain = build(tmp_path, task_flags, stock_arch(arch))
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            plain_shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
            # the plugin's own tiny archs have no stock twin of their size (test_plugin_models loads their
            # checkpoints strictly into the stock arch)
            assert arch in STOCK_ARCH or shapes == plain_shapes, arch
            assert type(model).__name__.startswith("QN") and len(wrapped_layers(model)) >= 14, arch
            built.append(arch)
    assert set(DOCUMENTED) <= set(built), sorted(set(DOCUMENTED) - set(built))
