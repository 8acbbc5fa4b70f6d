"""quantnoise.compress.plan: plan YAML reading (every key's type checked) and LayerRule / IPQPlan values."""
import pytest

from quantnoise.compress.layers import LayerRule
from quantnoise.compress.plan import IPQPlan, load_plan


def one_line_error(path, text, match, exc=ValueError):
    path.write_text(text)
    with pytest.raises(exc) as e:
        load_plan(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(path) in msg, msg
    assert match in msg, msg


@pytest.mark.parametrize("stage,named", [
    ("{pattern: 123}", "pattern=123"), ("{pattern: null}", "pattern=None"), ("{pattern: [fc]}", "pattern=['fc']"),
    ("{pattern: fc, exclude: 5}", "exclude=5"), ("{pattern: fc, scheme: 1}", "scheme=1"),
    ("{pattern: fc, scheme: [pq]}", "scheme=['pq']"), ("{pattern: fc, block_size: true}", "block_size=True"),
    ("{pattern: fc, block_size: 8.0}", "block_size=8.0"), ("{pattern: fc, block_size: '8'}", "block_size='8'"),
    ("{pattern: fc, n_centroids: 16.0}", "n_centroids=16.0"), ("{pattern: fc, n_centroids: false}", "n_centroids=False"),
    ("{pattern: fc, scheme: scalar, bits: '4'}", "bits='4'"), ("{pattern: fc, kmeans_iters: 1.5}", "kmeans_iters=1.5"),
    ("{pattern: fc, updates: true}", "updates=True"), ("{pattern: fc, updates: -1}", "updates=-1"),
])
def test_bad_stage_value_is_one_line_naming_stage_key_and_value(tmp_path, stage, named):
    one_line_error(tmp_path / "plan.yaml", f"stages:\n  - {stage}\n", f"stage 0: ipq {named}")


@pytest.mark.parametrize("seed", ["abc", "true", "[1]", "1.5", "null"])
def test_bad_seed_is_one_line(tmp_path, seed):
    one_line_error(tmp_path / "plan.yaml", f"seed: {seed}\nstages:\n  - {{pattern: fc}}\n", "seed=")


@pytest.mark.parametrize("text,match", [
    ("stages:\n  - fc1\n", "stage 0 is 'fc1', not a mapping"),
    ("stages:\n  - {pattern: fc}\n  - {1: 2, pattern: x}\n", "stage 1 has unknown keys ['1']"),
    ("stages: fc\n", "needs a top-level 'stages:' list"),
    ("stages: []\n", "has no stages"),
    ("", "needs a top-level 'stages:' list"),
    ("- {pattern: fc}\n", "needs a top-level 'stages:' list"),
    ("stages: [{pattern: fc}]\nsed: 1\n", "unknown top-level keys ['sed']"),
    ("stages: [{pattern: fc\n", "is not valid YAML"),
])
def test_bad_structure_is_one_line(tmp_path, text, match):
    one_line_error(tmp_path / "plan.yaml", text, match)


def test_missing_unreadable_or_binary_plan_is_one_line(tmp_path):
    with pytest.raises(OSError, match="ipq plan .*missing.yaml does not exist"):
        load_plan(tmp_path / "missing.yaml")
    with pytest.raises(OSError, match="is a folder, not a plan file"):
        load_plan(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00stages")
    with pytest.raises(ValueError, match="bin.yaml is not UTF-8 text"):
        load_plan(tmp_path / "bin.yaml")


def test_python_api_checks_types_too():
    with pytest.raises(ValueError, match="ipq seed=True"):
        IPQPlan(seed=True)
    with pytest.raises(ValueError, match="stage 0 is 'fc', not a LayerRule"):
        IPQPlan(stages=["fc"])
    with pytest.raises(ValueError, match="block_size=True"):
        LayerRule(block_size=True)
    assert LayerRule(pattern="fc", n_centroids=300).n_centroids == 300 and IPQPlan(seed=7).seed == 7
