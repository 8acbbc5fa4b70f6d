"""Post-training quantization of the pretrained all-MiniLM-L6-v2 sentence encoder, judged by a
linear probe: logistic regression on the fp32 encoder's mean-pooled TRAIN embeddings, then TEST
accuracy with each scheme's encoder under the same probe, and the embedding cosine to fp32.  Static
PTQ (int8 weights per row + int8 Linear inputs, min-max) once per activation scale granularity:
tensor (Q8BERT), token (dynamic, per row), channel (calibrated per input feature).

    python benchmarks/bert_probe.py TRAIN.tsv TEST.tsv [--calib-batches 8]
"""
import argparse
import copy
import json
import pathlib
import sys

import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

if __package__ in (None, ""):  # run as a file (python benchmarks/bert_probe.py): the repository root for the harness
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from quantnoise import hf, ptq  # noqa: E402
from quantnoise.config import ACT_GRANULARITIES
from quantnoise.compress.layers import LayerRule, compress_module, set_submodule
from quantnoise.presets import Q8BERT_LAYERS, q8bert


def compressed(model, bits):
    model = copy.deepcopy(model)
    rule = LayerRule(pattern=Q8BERT_LAYERS, scheme="scalar", bits=bits)
    for name, m in list(model.named_modules()):
        if name and isinstance(m, (nn.Linear, nn.Embedding)) and rule.matches(name):
            set_submodule(model, name, compress_module(m, rule, name))
    return model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("--calib-batches", type=int, default=8)
    harness.add_record_arg(ap, "bert_probe")
    a = ap.parse_args(argv)
    ytr, xtr = hf.read_tsv(a.train)
    yte, xte = hf.read_tsv(a.test, sorted(set(ytr)))
    tok, enc = hf.load_tokenizer(), hf.load_encoder().eval()
    tr, te = hf.batches(tok, xtr, None, 64, 64), hf.batches(tok, xte, None, 64, 64)

    def run(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    @torch.no_grad()
    def emb(model, data):
        out = [hf.mean_pool(run(model, b).last_hidden_state, b["attention_mask"]) for b in data]
        return torch.cat(out)[torch.cat([b["index"] for b in data]).argsort()]

    e_tr, ref = emb(enc, tr), emb(enc, te)
    probe = LogisticRegression(max_iter=2000, C=10.0).fit(nn.functional.normalize(e_tr, dim=-1).numpy(), ytr)
    schemes = {"fp32": lambda: enc, "dq": lambda: ptq.dynamic_int8(enc),
               **{f"ptq_int8 act per {g} (minmax)": lambda g=g: ptq.static_int8(
                   enc, tr[: a.calib_batches], run, q8bert(act_granularity=g))
                  for g in ACT_GRANULARITIES},
               "int8 weights only": lambda: compressed(enc, 8), "int4 weights only": lambda: compressed(enc, 4)}
    res = {}
    for name, build in schemes.items():  # built one at a time: one model copy in memory
        e = ref if name == "fp32" else emb(build(), te)
        acc = float((probe.predict(nn.functional.normalize(e, dim=-1).numpy()) == yte).mean())
        res[name] = {"acc": round(acc, 4), "cos": round(hf.cosine(e, ref), 5)}
        print(f"{name}: probe test acc {acc:.4f}, cosine to fp32 {res[name]['cos']:.5f}", flush=True)
    print(json.dumps(res))
    harness.save("bert_probe", {"calib_batches": a.calib_batches, "schemes": res}, a.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
