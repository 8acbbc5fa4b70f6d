"""scripts/bert_budget_dev.py (issue 20, run 4) and the recipe functions it reuses (recipes/bert/table.py:
``Run.qbert3_plans`` at another budget, ``plan_layers``, ``Run.posthoc3_model``, ``Run.qat3_model``): a tiny run
from an untrained fp32 checkpoint, DEV only, resumable."""
import importlib.util
import json
import sys

import pytest

from conftest import ROOT
from test_recipe_bert import data, tsv  # noqa: F401  (the fixture and its helper)


def _script():
    spec = importlib.util.spec_from_file_location("bert_budget_dev", ROOT / "scripts" / "bert_budget_dev.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_budget_run_and_resume(data, tmp_path, capsys):  # noqa: F811
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from quantnoise import LayerBits, hf

    script = _script()
    table = sys.modules["table"]
    train, dev, test = data
    out = tmp_path / "out"
    (out / "ckpt").mkdir(parents=True)
    torch.save(hf.load_classifier(2, seed=1).state_dict(), out / "ckpt" / "fp32.pt")  # stands in for the recipe's
    test.unlink()  # DEV only: the TEST file is never opened
    ref = tmp_path / "ref" / "stages"
    ref.mkdir(parents=True)
    (ref / "int3_qat.json").write_text(json.dumps({"dev_acc": 0.25, "bytes": 1234}))

    args = [str(train), str(dev), str(out), "--size", "tiny", "--avg-bits", "2.5", "--no-qat", "inverted",
            "--ref-dir", str(ref.parent)]
    assert script.main(args) == 0
    md = capsys.readouterr().out
    res = json.loads((out / "b2.5_results.json").read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows)[:3] == ["int2", "b2.5_hessian", "b2.5_inverted"]
    plan = json.loads((out / "stages" / "b2.5_plan.json").read_text())
    n = len(plan["hessian"]["bits"])
    assert n == 40 and (out / "ckpt" / "b2.5_hessian_plan.yaml").exists()
    assert rows["int2"]["weight_bits"] == 2.0 and rows["int2"]["layers_at_bits"] == {"2": n, "3": 0, "4": 0, "8": 0}
    for k in ("hessian", "inverted"):  # the knapsack at 2.5 bits: within budget, not uniform int2
        r = rows[f"b2.5_{k}"]
        assert 2.0 < r["weight_bits"] <= 2.5 and r["weight_bits"] == plan[k]["avg_bits"]
        assert sum(r["layers_at_bits"].values()) == n and r["bytes"] > rows["int2"]["bytes"]
    assert "qat" in rows["int2"] and "qat" in rows["b2.5_hessian"] and "qat" not in rows["b2.5_inverted"]
    assert all(0.0 <= r["posthoc"] <= 1.0 for r in rows.values() if r.get("posthoc") is not None)
    assert rows["int3 (from %s, not rerun)" % ref.parent]["qat"] == 0.25
    assert "| b2.5_hessian | " in md and "| DEV after QAT |" in md
    # the plan's layers: one scale per head on q/k/v only
    layers = table.plan_layers(plan, "hessian")
    assert {k for k, s in layers.items() if s.rows_per_scale != 1} == {k for k in layers if "attention.self" in k}

    # the post-hoc model of uniform per-row int3 is run_int3_posthoc's (``compressed``), value for value
    run = table.Run(__import__("argparse").Namespace(train=str(train), dev=str(dev), test=str(dev), outdir=str(out),
                                                     size="tiny", seed=1, epochs=None, lr=None, stages=None,
                                                     child=False))
    a = run.posthoc3_model({k: LayerBits(bits=3) for k in layers}).state_dict()
    b = table.compressed(run.fp32(), 3, clip=table.QBERT3_CLIP).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = run.posthoc3_model(layers).state_dict()  # the plan's widths and head scales: another model
    assert any(k not in c or a[k].shape != c[k].shape or not torch.equal(a[k], c[k]) for k in a)

    # resumable: a rerun skips every stage and prints the same table
    assert script.main(args) == 0
    assert capsys.readouterr().out == md
    assert script.main(args[:-4] + ["--rows", "int2,bogus"]) == 2
