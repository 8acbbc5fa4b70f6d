"""Every config in configs/ composes with Hydra's compose API against fairseq's schema, the
quant_noise group turns into the core config it promises, the Slurm launcher setting composes,
and a 2-value noise-rate sweep runs end to end through fairseq-hydra-train and sweep-report."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, USER_DIR, run

CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
NOISE = sorted(p.stem for p in (CONFIGS / "quant_noise").glob("*.yaml"))
# what each quant_noise option must become in the core QuantNoiseConfig (None = no noise)
EXPECTED = {"none": None, "drop": ("drop", 0.1, 8), "scalar_int8": ("scalar", 0.1, 8),
            "scalar_int4": ("scalar", 0.5, 4), "pq": ("pq", 0.1, 8), "q8bert": ("scalar", 1.0, 8)}


def compose(name: str, overrides=(), hydra_cfg=False):
    """Compose like fairseq-hydra-train does: FairseqConfig stored as the schema of ``name``."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    hydra_init(name)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = hydra_compose(name, overrides=["task.data=/data", f"common.user_dir={USER_DIR}", *overrides],
                            return_hydra_config=hydra_cfg)
    if not hydra_cfg:
        add_defaults(cfg)
    return cfg


def test_the_configs_exist():
    assert {"lm_tiny", "translation_tiny", "roberta_tiny"} <= set(EXPERIMENTS)
    assert set(NOISE) == set(EXPECTED)


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_each_noise_option(experiment, noise):
    from argparse import Namespace

    from fairseq import utils

    utils.import_user_module(Namespace(user_dir=USER_DIR))
    from qn_fairseq.args import noise_config

    cfg = compose(experiment, [f"quant_noise={noise}"])
    assert cfg.model._name.startswith("qn_") and cfg.task.data == "/data"
    assert cfg.common.user_dir == USER_DIR
    core = noise_config(cfg.model)
    if EXPECTED[noise] is None:
        assert core is None
    else:
        assert (core.scheme, core.p, core.bits if core.scheme == "scalar" else core.block_size) == EXPECTED[noise]
    if noise == "q8bert":  # the Hydra option is exactly the Python preset
        from quantnoise.presets import q8bert

        assert core == q8bert(seed=core.seed)


def test_lm_model_node_validates_against_the_plugin_dataclass():
    """The LM's schema is QNTransformerLMConfig: values are typed, and typos are rejected."""
    from argparse import Namespace

    from fairseq import utils
    from fairseq.dataclass.utils import merge_with_parent
    from omegaconf.errors import ConfigKeyError

    utils.import_user_module(Namespace(user_dir=USER_DIR))
    from qn_fairseq.models import QNTransformerLMConfig

    cfg = compose("lm_tiny", ["quant_noise=pq", "model.quant_noise_p=0.05"])
    typed = merge_with_parent(QNTransformerLMConfig(), cfg.model)
    assert typed.quant_noise_p == 0.05 and typed.quant_noise_centroids == 256 and typed.decoder_layers == 2
    with pytest.raises(ConfigKeyError):
        merge_with_parent(QNTransformerLMConfig(), compose("lm_tiny", ["+model.quant_noise_pp=0.1"]).model)


def test_untyped_model_nodes_reject_misspelt_quant_noise_keys():
    from argparse import Namespace

    from fairseq import utils

    utils.import_user_module(Namespace(user_dir=USER_DIR))
    from qn_fairseq.args import noise_config

    with pytest.raises(SystemExit, match="quant_noise_rate"):
        noise_config(compose("translation_tiny", ["+model.quant_noise_rate=0.1"]).model)


def test_act_granularity_option_reaches_the_core_config_and_a_bad_value_names_the_flag():
    from argparse import Namespace

    from fairseq import utils

    utils.import_user_module(Namespace(user_dir=USER_DIR))
    from qn_fairseq.args import noise_config

    over = ["quant_noise=q8bert", "model.quant_noise_act_granularity="]
    assert noise_config(compose("roberta_tiny", [over[0], over[1] + "token"]).model).act_granularity == "token"
    with pytest.raises(SystemExit, match="--quant-noise-act-granularity='row' is invalid: choose one of tensor"):
        noise_config(compose("roberta_tiny", [over[0], over[1] + "row"]).model)


@pytest.mark.parametrize("launcher", [["+cluster=slurm"], ["hydra/launcher=submitit_slurm"]])
def test_slurm_launcher_setting_composes(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pinned in scripts/requirements.txt")
    cfg = compose("lm_tiny", launcher, hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    if launcher == ["+cluster=slurm"]:
        assert cfg.hydra.launcher.gpus_per_node == 8 and cfg.hydra.launcher.tasks_per_node == 1
    local = compose("lm_tiny", [], hydra_cfg=True)
    assert local.hydra.launcher._target_.endswith("BasicLauncher")


@pytest.mark.slow
def test_two_value_sweep_end_to_end(lm_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(["fairseq-hydra-train", "-m", "--config-dir", CONFIGS, "--config-name", "lm_tiny",
                f"task.data={lm_data}", f"common.user_dir={USER_DIR}", "model.quant_noise_p=0,0.1",
                "optimization.max_update=12", "dataset.max_tokens=512", "task.tokens_per_sample=32",
                "model.decoder_embed_dim=64", "model.decoder_input_dim=64", "model.decoder_output_dim=64",
                f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    jobs = sorted(p.parent.parent.name for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert jobs == ["0", "1"], proc.stderr[-2000:]
    assert list(sweep.glob("*/checkpoints/checkpoint_last.pt")).__len__() == 2  # each in its own folder
    log0, log1 = ((sweep / j / "hydra_train.log").read_text() for j in jobs)
    assert "quant-noise" not in log0 and re.search(r"quant-noise drop p=0.1 on \d+ layers", log1)

    out = run(["quantnoise", "sweep-report", sweep])
    assert "2 ok, 0 crashed, 0 missing" in out.stdout
    rows = [l for l in (sweep / "report.md").read_text().splitlines() if re.match(r"\| \d ", l)]
    assert len(rows) == 2
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[2] for c in cells] == ["none", "drop"] and [c[3] for c in cells] == ["0", "0.1"]
    assert all(float(c[5]) > 1 and c[6] == "12" and float(c[7]) > 0 and c[8] == "ok" for c in cells)
    assert (sweep / "ppl_vs_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
