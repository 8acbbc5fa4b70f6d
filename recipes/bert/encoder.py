"""Task-agnostic Quant-Noise distillation of a pretrained BERT encoder (issue 34), the pieces recipes/bert/table.py
runs as stages.

Fan, Stock et al. 2020 (Quant-Noise) pre-train RoBERTa with the noise, so that iPQ of the encoder costs little on
every task later.  Here the pretrained all-MiniLM-L6-v2 is the student, with Quant-Noise (true pq noise, iPQ's
block sizes) on the layers iPQ compresses, and the frozen pretrained encoder is the teacher: the student learns to
reproduce the teacher's hidden states on unlabelled sentences, loss

    L = mean over real tokens t and features d of (h_student[t, d] - h_teacher[t, d])^2       (MSE)

of the last hidden states (``layers="last"``) or the mean of that MSE over every hidden state the encoder returns
(the embeddings' output and each layer's: ``layers="all"``).  The control runs the same steps without noise.

The text: ``corpus_lines`` (scripts/make_corpus.py's standard-library docstrings, a paragraph a line, or any
``--text`` file, a line a line), split by ``split_lines`` into distillation / DEV / TEST sentences; the held-out
ones judge the encoders by the cosine of their mean-pooled sentence embeddings to the fp32 teacher's
(``sentence_embeddings``), before and after post-hoc iPQ (``ipq_copy``).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import pathlib
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from quantnoise import IPQPlan, compress_, hf, unquantize_
from quantnoise.compress.layers import LayerRule

log = logging.getLogger("recipes.bert")
ROOT = pathlib.Path(__file__).resolve().parents[2]
DISTILL_LAYERS = ("last", "all")
CORPORA = ("stdlib", "all-stdlib")  # make_corpus.py's 34-module default, or every pure-Python stdlib module
MIN_LINES = 20  # as make_corpus.py: fewer usable lines is an error


def _make_corpus():
    """scripts/make_corpus.py as a module (scripts/ is no package): its corpora and its line splitting."""
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "scripts" / "make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus_lines(text: Optional[str] = None, corpus: str = "all-stdlib", max_lines: int = 200_000) -> List[str]:
    """Unlabelled sentences: the lines of the plain-text file ``text`` (one a line), else make_corpus.py's
    docstring corpus ``corpus`` (one paragraph a line); tokenised and lowercased as make_corpus.py does (MiniLM is
    uncased).  ValueError naming the file when it is missing or has fewer than MIN_LINES usable lines."""
    mc = _make_corpus()
    if text is not None:
        path = pathlib.Path(text)
        if not path.is_file():
            raise ValueError(f"--text {text!r} is not a file: pass a plain-text file, one sentence a line")
        lines = mc.lines_of(path.read_text(encoding="utf-8", errors="replace"), max_lines, "line")
    elif corpus in CORPORA:
        lines = mc.lines_of(mc.all_stdlib_text() if corpus == "all-stdlib" else mc.stdlib_text(), max_lines, "paragraph")
    else:
        raise ValueError(f"corpus {corpus!r}: choose one of {', '.join(CORPORA)}, or pass --text FILE")
    if len(lines) < MIN_LINES:
        raise ValueError(f"--text {text or corpus!r}: only {len(lines)} usable lines; the distillation needs at least "
                         f"{MIN_LINES} (one sentence a line)")
    return lines


def split_lines(lines: Sequence[str], eval_lines: int) -> Tuple[List[str], List[str], List[str]]:
    """(distillation, DEV, TEST) sentences: line i goes to DEV when i % 20 == 0, to TEST when i % 20 == 1 (as
    make_corpus.py splits valid / test), each held-out split cut to its first ``eval_lines``; the rest distil.
    Fixed, not seeded: every seed's encoders are judged on the same held-out sentences, none of them distilled on."""
    dev = [x for i, x in enumerate(lines) if i % 20 == 0][:eval_lines]
    test = [x for i, x in enumerate(lines) if i % 20 == 1][:eval_lines]
    return [x for i, x in enumerate(lines) if i % 20 > 1], dev, test


def hidden_mse(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Mean over the hidden states given (pairs of (B, T, H)) of the MSE over real tokens (``mask`` (B, T) = 1)
    and features: padding does not count."""
    m = mask.unsqueeze(-1).to(student[0].dtype)  # (B, T, 1)
    n = m.sum() * student[0].shape[-1]
    return torch.stack([((s - t) ** 2 * m).sum() / n for s, t in zip(student, teacher)]).mean()


def _hidden(out, layers: str) -> Tuple[Tensor, ...]:
    return tuple(out.hidden_states) if layers == "all" else (out.last_hidden_state,)


def distill_encoder_(student: nn.Module, teacher: nn.Module, data: List[Dict[str, Tensor]], steps: int, lr: float,
                     seed: int, layers: str = "last", tag: str = "", log_every: int = 20) -> List[float]:
    """``steps`` AdamW steps (weight decay 0.01, linear warm-up 10 % then decay, clip 1.0) of ``student`` towards the
    frozen ``teacher``'s hidden states (``hidden_mse``; ``layers``: "last" | "all") on ``data``'s batches in a seeded
    order (cycling); the student in training mode (dropout and any Quant-Noise wrapper active).  Returns the losses."""
    if layers not in DISTILL_LAYERS:
        raise ValueError(f"--encoder-distill {layers!r}: choose last (the last hidden state) or all (every layer's output)")
    params = [p for p in student.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    teacher.eval()
    student.train()
    order, losses, rng = [], [], random.Random(seed)
    for step in range(steps):
        if not order:
            order = list(range(len(data)))
            rng.shuffle(order)
        b = data[order.pop()]
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=layers == "all")
        with torch.no_grad():
            target = _hidden(teacher(**kw), layers)
        loss = hidden_mse(_hidden(student(**kw), layers), target, b["attention_mask"])
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info("%s step %d/%d loss %.5f", tag, step + 1, steps, sum(losses[-log_every:]) / len(losses[-log_every:]))
    student.eval()
    return losses


@torch.no_grad()
def sentence_embeddings(model: nn.Module, data: List[Dict[str, Tensor]]) -> Tensor:
    """Mean-pooled last hidden states (all-MiniLM-L6-v2's sentence embedding) of ``data``, in input order. (N, H)"""
    model.eval()
    out = [hf.mean_pool(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state,
                        b["attention_mask"]) for b in data]
    return torch.cat(out)[torch.cat([b["index"] for b in data]).argsort()]


def ipq_copy(model: nn.Module, groups: Sequence[Tuple[str, str, int]], n_centroids: int, kmeans_iters: int,
             seed: int, only: Optional[Sequence[str]] = None) -> nn.Module:
    """A post-hoc iPQ copy of ``model`` (no fine-tuning): each (group, pattern, block size) of ``groups`` (or of
    ``only`` among them) through ``quantnoise.compress_`` with ``n_centroids`` centroids, k-means seeded."""
    model = copy.deepcopy(model)
    unquantize_(model)
    rules = [LayerRule(pattern=pat, scheme="pq", block_size=bs, n_centroids=n_centroids, kmeans_iters=kmeans_iters)
             for g, pat, bs in groups if only is None or g in only]
    compress_(model, IPQPlan(stages=rules, seed=seed))
    return model.eval()
