"""iPQ settings as a plan of stages, read from YAML, and post-hoc iPQ of a whole state dict.

One YAML file serves both uses: ``quantnoise quantize --config plan.yaml`` applies every stage at
once; ``fairseq-train --ipq-plan plan.yaml`` (the plugin) quantizes one stage at a time and
fine-tunes the centroids for ``updates`` updates before the next (Stock et al. 2020, sec. 3.3: the
paper's order is FFN -> embeddings -> attention)::

    seed: 0
    stages:                       # a layer takes the first stage whose pattern matches its name
      - {pattern: 'fc[12]', block_size: 8, n_centroids: 256, updates: 300}
      - {pattern: 'embed_tokens|output_projection', block_size: 8, updates: 300}
      - {pattern: '_proj', block_size: 4, updates: 300}
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ..config import is_int
from ..nn import ACT_RANGES
from .layers import LayerRule, pq_quantize, scalar_codes, scalar_decode

logger = logging.getLogger(__name__)


@dataclass
class IPQPlan:
    stages: List[LayerRule] = field(default_factory=lambda: [LayerRule()], metadata={"help": "ordered stages"})
    seed: int = field(default=0, metadata={"help": "base seed of every layer's k-means (plus a hash of its name)"})

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ValueError("ipq plan has no stages: give at least one {pattern: ...} entry under 'stages'")
        for i, rule in enumerate(self.stages):
            if not isinstance(rule, LayerRule):
                raise ValueError(f"ipq plan stage {i} is {rule!r}, not a LayerRule")
        if not is_int(self.seed):
            raise ValueError(f"ipq seed={self.seed!r} is invalid: use an integer")

    def rule_for(self, name: str) -> Tuple[int, Optional[LayerRule]]:
        """(stage index, rule) of the first stage matching ``name``; (-1, None) when none does."""
        for i, rule in enumerate(self.stages):
            if rule.matches(name):
                return i, rule
        return -1, None

    def layer_seed(self, name: str) -> int:
        return (self.seed + zlib.crc32(name.encode())) % (2**31)

    def stage_starts(self) -> List[int]:
        """Update at which each stage is quantized: stage i starts after the updates of stages < i."""
        starts, t = [], 0
        for rule in self.stages:
            starts.append(t)
            t += rule.updates
        return starts


def load_plan(path) -> IPQPlan:
    """Read a plan YAML; ValueError naming the file and the bad key or value."""
    import yaml

    path = pathlib.Path(path)
    if not path.exists():
        raise OSError(f"ipq plan {path} does not exist; pass the path of a plan YAML file")
    if path.is_dir():
        raise OSError(f"ipq plan {path} is a folder, not a plan file; pass the path of a plan YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"ipq plan {path} is not UTF-8 text; pass a plan YAML file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"ipq plan {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        raise ValueError(f"ipq plan {path} needs a top-level 'stages:' list of {{pattern: ..., ...}} entries")
    extra = set(raw) - {"stages", "seed"}
    if extra:
        raise ValueError(f"ipq plan {path}: unknown top-level keys {sorted(map(str, extra))}; allowed: stages, seed")
    known = {f.name for f in dataclasses.fields(LayerRule)}
    stages = []
    for i, entry in enumerate(raw["stages"]):
        if not isinstance(entry, dict):
            raise ValueError(f"ipq plan {path}: stage {i} is {entry!r}, not a mapping; write it as "
                             f"{{pattern: ..., block_size: ..., ...}}")
        if set(entry) - known:
            raise ValueError(f"ipq plan {path}: stage {i} has unknown keys {sorted(map(str, set(entry) - known))}; "
                             f"allowed: {', '.join(sorted(known))}")
        try:
            stages.append(LayerRule(**entry))
        except ValueError as e:
            raise ValueError(f"ipq plan {path}: stage {i}: {e}") from None
    try:
        return IPQPlan(stages=stages, seed=raw.get("seed", 0))
    except ValueError as e:
        raise ValueError(f"ipq plan {path}: {e}") from None


def _storage_key(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def quantize_state_dict(state: Dict[str, Tensor], plan: IPQPlan,
                        progress: Callable[[Iterable], Iterable] = lambda it: it) -> Tuple[Dict[str, Tensor], List[str]]:
    """Post-hoc iPQ / scalar quantization of every ``L.weight`` (2-d or more) whose layer name ``L``
    matches a stage: returns (new state dict, quantized layer names).  A weight stored twice (tied,
    e.g. an output projection sharing the embedding) is quantized once; the other key receives the
    decoded weight, so both stay equal."""
    candidates = [k[: -len(".weight")] for k, t in state.items()
                  if k.endswith(".weight") and t.dim() >= 2 and t.dtype.is_floating_point]
    chosen = [(n, plan.rule_for(n)[1]) for n in candidates if plan.rule_for(n)[1] is not None]
    if not chosen:
        sample = ", ".join(candidates[:6]) or "none"
        raise ValueError(f"no layer matches the ipq patterns {[r.pattern for r in plan.stages]} "
                         f"(first candidates: {sample}); fix the patterns (regexes searched in layer names)")
    out = dict(state)
    done: Dict[tuple, str] = {}
    names = []
    for name, rule in progress(chosen):
        w = state[f"{name}.weight"]
        skey = _storage_key(w)
        if skey in done:  # tied copy of a weight quantized above
            continue
        del out[f"{name}.weight"]
        for key in ACT_RANGES:  # a QNLinear's activation ranges: the compressed layer has none
            out.pop(f"{name}.{key}", None)
        out[f"{name}.weight_size"] = torch.tensor(w.shape)
        if rule.scheme == "pq":
            codes, cents = pq_quantize(w, rule.block_size, rule.n_centroids, rule.kmeans_iters,
                                       seed=plan.layer_seed(name), name=f"layer '{name}'")
            out[f"{name}.codes"], out[f"{name}.centroids"] = codes, cents.to(w.dtype)
            decoded = cents[codes.long()].reshape(w.shape).to(w.dtype)
        else:
            q, scale = scalar_codes(w, rule, name=f"layer '{name}'")
            out[f"{name}.qweight"], out[f"{name}.qscale"], out[f"{name}.qbits"] = q, scale, torch.tensor(rule.bits)
            decoded = scalar_decode(q, scale, w.shape, w.dtype)
        done[skey] = name
        names.append(name)
        for key, t in state.items():  # tied copies elsewhere (a bare Parameter or a second layer)
            if key != f"{name}.weight" and key in out and t.dim() >= 2 and _storage_key(t) == skey:
                out[key] = decoded
    return out, names
