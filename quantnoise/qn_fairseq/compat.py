"""Let fairseq's checkpoint loader read checkpoints of argparse models.

fairseq (0.12) calls ``torch.load(f)`` without ``weights_only``; since torch 2.6 that means
``weights_only=True``, which refuses any class not on torch's allowlist.  Checkpoints of fairseq's
argparse models (``transformer``, ``roberta`` and our ``qn_transformer``, ``qn_roberta``) store
their arguments as an ``argparse.Namespace``, so ``fairseq-generate``, ``fairseq-interactive`` and
``RobertaModel.from_pretrained`` could not load them.  We allowlist exactly that one class (a plain
attribute bag) instead of turning the safe loader off.
"""
import argparse

import torch

torch.serialization.add_safe_globals([argparse.Namespace])
