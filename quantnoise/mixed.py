"""Mixed-precision quantization-aware fine-tuning from a bit plan (Q-BERT, Shen et al. 2020: per-layer
widths from the Hessian spectrum, sec. 3.1; group-wise scales, sec. 3.2; fine-tuning with the quantizers
in place).

``MixedPrecisionConfig`` holds one ``LayerBits`` per layer, by exact module name: its width, the rows that
share a scale (``rows_per_scale``: head_dim on a q/k/v projection = one scale per attention head) and its
noise rate p: 1 is full QAT (every weight fake-quantized on every training forward, the straight-through
estimator), p < 1 is Quant-Noise (Fan et al. 2020: a random p of the weight blocks per forward).
``quantize_(model, cfg)`` wraps each named layer in a scalar quant-noise wrapper at its width (one
``QuantNoiseConfig`` per layer, ``layer_config``); after training, ``compress_(model, cfg.to_ipq_plan())``
(or ``quantize_state_dict``) stores each layer at its width, with the same scales the fake quantizer used
(min/max observer: the stored integers are the fine-tuned model's own), so the ``.qnz`` holds the plan.

``load_bit_plan(source)`` reads a plan from a ``BitPlan`` (quantnoise.compress.bitplan), an ``IPQPlan`` of
scalar stages, a mapping {layer: bits | {bits, rows_per_scale, p}} (also under a ``layers:`` key), or a
YAML / JSON file of one of these (``quantnoise sensitivity -o plan.yaml`` and ``BitPlan.save_yaml`` write the
stage form: one ``{pattern: '^name$', scheme: scalar, bits: b}`` stage per layer).
"""
from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Mapping, Optional

from .config import CLIPS, OBSERVERS, QuantNoiseConfig, is_int, is_real


@dataclass
class LayerBits:
    """One layer's part of a bit plan."""

    bits: int = field(metadata={"help": "integer bits, 2..8"})
    rows_per_scale: int = field(default=1, metadata={"help": "consecutive output rows sharing one scale (1 = per row, "
                                                              "0 = one per tensor, head_dim = one per attention head)"})
    p: Optional[float] = field(default=None, metadata={"help": "this layer's noise rate (None: the config's p)"})
    clip: Optional[str] = field(default=None, metadata={"help": "this layer's range: minmax | mse (None: the config's clip)"})

    def __post_init__(self) -> None:
        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is invalid: use an integer from 2 to 8")
        if not is_int(self.rows_per_scale) or self.rows_per_scale < 0:
            raise ValueError(f"rows_per_scale={self.rows_per_scale!r} is invalid: use 1 (per row), 0 (per tensor) "
                             f"or a divisor of the layer's output rows")
        if self.p is not None and (not is_real(self.p) or not 0.0 < float(self.p) <= 1.0):
            raise ValueError(f"p={self.p!r} is invalid: use a probability in (0, 1] (1 = full QAT)")
        if self.clip is not None and self.clip not in CLIPS:
            raise ValueError(f"clip={self.clip!r} is invalid: choose one of {', '.join(CLIPS)} (None: the config's)")
        self.bits, self.rows_per_scale = int(self.bits), int(self.rows_per_scale)
        self.p = None if self.p is None else float(self.p)


@dataclass
class MixedPrecisionConfig:
    """Scalar fake quantization of the layers of a bit plan, each at its own width, for ``quantize_``."""

    layers: Dict[str, LayerBits] = field(metadata={"help": "exact module name -> its bits (model.named_modules())"})
    p: float = field(default=1.0, metadata={"help": "noise rate of the layers that set none: 1 = full QAT, < 1 = Quant-Noise"})
    block_size: int = field(default=1, metadata={"help": "p < 1: weights per noised block (1: each weight on its own, as "
                                                         "fairseq's scalar quant-noise)"})
    observer: str = field(default="minmax", metadata={"help": "range: minmax of the current weights (what compress_ stores) | ema"})
    clip: str = field(default="minmax", metadata={"help": "range of the layers that set none: max|w| per scale group "
                                                           "(minmax) | mse: its MSE-optimal clip, searched every forward and "
                                                           "by compress_ alike (for 2-4 bits)"})
    eval_quantized: bool = field(default=True, metadata={"help": "evaluate with every weight quantized (the model as exported)"})
    act_bits: Optional[int] = field(default=None, metadata={"help": "Linear input activations: bits, or None (float)"})
    seed: int = field(default=0, metadata={"help": "seed of the noise masks (p < 1)"})

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping) or not self.layers:
            raise ValueError("bit plan has no layers: give {layer name: LayerBits(bits=...)} for at least one layer")
        if not all(isinstance(n, str) and isinstance(s, LayerBits) for n, s in self.layers.items()):
            self.layers = load_bit_plan(self.layers)  # {name: bits | {bits, ...}} (e.g. from YAML / Hydra)
        if not is_real(self.p) or not 0.0 < float(self.p) <= 1.0:
            raise ValueError(f"bit plan p={self.p!r} is invalid: use a probability in (0, 1] (1 = full QAT)")
        if self.observer not in OBSERVERS:
            raise ValueError(f"bit plan observer={self.observer!r} is invalid: choose one of {', '.join(OBSERVERS)}")
        if self.clip not in CLIPS:
            raise ValueError(f"bit plan clip={self.clip!r} is invalid: choose one of {', '.join(CLIPS)}")
        self.layers, self.p = dict(self.layers), float(self.p)
        for name in self.layers:  # every per-layer config is checked now, not when the model is met
            self.layer_config(name)

    @classmethod
    def from_plan(cls, source, **kwargs) -> "MixedPrecisionConfig":
        """The config of a plan (see ``load_bit_plan``); ``kwargs``: the other fields (p, observer, ...)."""
        return cls(layers=load_bit_plan(source), **kwargs)

    def layer_config(self, name: str) -> QuantNoiseConfig:
        """The scalar QuantNoiseConfig of layer ``name``: its bits, its scale groups, its p."""
        spec = self.layers[name]
        p = self.p if spec.p is None else spec.p
        try:
            return QuantNoiseConfig(scheme="scalar", p=p, block_size=self.block_size, bits=spec.bits, symmetric=True,
                                    granularity="tensor" if spec.rows_per_scale == 0 else "channel",
                                    rows_per_scale=max(spec.rows_per_scale, 1), observer=self.observer,
                                    clip=self.layer_clip(name),
                                    eval_quantized=self.eval_quantized, act_bits=self.act_bits, seed=self.seed,
                                    include=f"^{re.escape(name)}$")
        except ValueError as e:
            raise ValueError(f"bit plan layer {name!r}: {e}") from None

    def layer_clip(self, name: str) -> str:
        spec = self.layers[name]
        return self.clip if spec.clip is None else spec.clip

    def to_ipq_plan(self, seed: int = 0):
        """The post-training step as an ``IPQPlan`` for ``compress_`` / ``quantize_state_dict``: one scalar stage
        per layer at its width and scale groups."""
        from .compress.layers import LayerRule
        from .compress.plan import IPQPlan

        return IPQPlan(stages=[LayerRule(pattern=f"^{re.escape(n)}$", scheme="scalar", bits=s.bits,
                                         rows_per_scale=s.rows_per_scale, clip=self.layer_clip(n))
                                for n, s in self.layers.items()], seed=seed)

    def subset(self, keep: Callable[[str], bool]) -> Optional["MixedPrecisionConfig"]:
        """The same config restricted to the layers whose name ``keep`` accepts (None when none is)."""
        import dataclasses

        layers = {n: s for n, s in self.layers.items() if keep(n)}
        return dataclasses.replace(self, layers=layers) if layers else None


_EXACT = re.compile(r"\^((?:[^\\^$.|?*+()\[\]{}]|\\.)*)\$")  # '^name$' with regex metacharacters escaped


def _name_of(pattern: str, where: str) -> str:
    """The module name of an anchored, escaped stage pattern ('^encoder\\.layer\\.0\\.fc1$' -> 'encoder.layer.0.fc1')."""
    m = _EXACT.fullmatch(pattern)
    if not m:
        raise ValueError(f"{where}: pattern {pattern!r} is not one exact layer name ('^name$', as quantnoise "
                         f"sensitivity -o writes it); a bit plan gives each layer its own width")
    return re.sub(r"\\(.)", r"\1", m.group(1))


def load_bit_plan(source, where: str = "bit plan") -> Dict[str, LayerBits]:
    """{layer name: LayerBits} of a BitPlan, an IPQPlan of scalar stages, a mapping, or a YAML / JSON file of
    a mapping or of stages.  ValueError (one line, naming the file and the entry) for anything else."""
    from .compress.bitplan import BitPlan
    from .compress.plan import IPQPlan

    if isinstance(source, BitPlan):
        return {n: LayerBits(bits=b) for n, b in source.bits.items()}
    if isinstance(source, IPQPlan):
        out = {}
        for i, rule in enumerate(source.stages):
            if rule.scheme != "scalar":
                raise ValueError(f"{where}: stage {i} ({rule.pattern!r}) has scheme {rule.scheme!r}; a bit plan's "
                                 f"stages are scalar")
            out[_name_of(rule.pattern, f"{where} stage {i}")] = LayerBits(
                bits=rule.bits, rows_per_scale=rule.rows_per_scale, clip=None if rule.clip == "minmax" else rule.clip)
        return out
    if isinstance(source, (str, pathlib.Path)):
        return _load_file(pathlib.Path(source))
    if not isinstance(source, Mapping):
        raise ValueError(f"{where} is a {type(source).__name__}; pass a BitPlan, a {{layer: bits}} mapping or a "
                         f"YAML / JSON plan file")
    entries = source.get("layers", source) if isinstance(source.get("layers"), Mapping) else source
    out = {}
    known = {f.name for f in fields(LayerBits)}
    for name, spec in entries.items():
        try:
            if isinstance(spec, LayerBits):
                out[str(name)] = spec
            elif isinstance(spec, Mapping):
                extra = set(spec) - known
                if extra:
                    raise ValueError(f"unknown keys {sorted(map(str, extra))}; allowed: {', '.join(sorted(known))}")
                out[str(name)] = LayerBits(**spec)
            else:
                out[str(name)] = LayerBits(bits=spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: layer {name!r}: {e}") from None
    if not out:
        raise ValueError(f"{where} names no layer; give {{layer name: bits}}")
    return out


def _load_file(path: pathlib.Path) -> Dict[str, LayerBits]:
    import yaml

    from .compress.plan import load_plan

    if not path.is_file():
        raise OSError(f"bit plan {path} does not exist or is not a file; pass a plan YAML / JSON file "
                      f"(quantnoise sensitivity -o plan.yaml writes one)")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ValueError(f"bit plan {path} is not UTF-8 text; pass a plan YAML / JSON file") from None
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"bit plan {path} does not parse ({str(e).splitlines()[0]})") from None
    if isinstance(raw, dict) and "stages" in raw:
        return load_bit_plan(load_plan(path), where=f"bit plan {path}")
    return load_bit_plan(raw if isinstance(raw, dict) else [], where=f"bit plan {path}")


__all__ = ["LayerBits", "MixedPrecisionConfig", "load_bit_plan"]
