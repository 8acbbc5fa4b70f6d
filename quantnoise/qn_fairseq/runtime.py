"""fairseq models of a ``.qnz`` that run compressed (quantnoise.runtime's layers).

``load_model(path)`` builds the model with fairseq's own ``task.build_model`` on the ``meta`` device (no
memory, no random init), then fills it with the file's codes / int weights as runtime layers and its
other tensors as they are: no fp32 copy of a compressed weight is made.

With the plugin, ``fairseq.checkpoint_utils.load_model_ensemble_and_task`` (what ``fairseq-eval-lm``,
``fairseq-generate``, ``fairseq-interactive`` and ``from_pretrained`` call) loads ``.qnz`` paths this way;
other paths go to fairseq's function unchanged.  ``QUANTNOISE_QNZ_DECODE=1`` in the environment turns
this off: the ``.qnz`` is then decoded into an ordinary fp32 model (the path quantnoise/qn_fairseq/ipq.py
installs, also used by ``--restore-file``).
"""
import contextlib
import logging
import os
import threading
from typing import Optional

import torch
from fairseq import utils as fairseq_utils
from fairseq.models.roberta.model import RobertaLMHead
from fairseq.modules import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding
from fairseq.modules.transformer_layer import TransformerDecoderLayer, TransformerDecoderLayerBase
from torch import nn

from quantnoise.checkpoint import stock_checkpoint
from quantnoise.compress.layers import mixed_class
from quantnoise.export import read_qnz
from quantnoise.runtime import RuntimeMixin, fill_model_, release_freed_memory, runtime_summary

from .args import route_attention

logger = logging.getLogger(__name__)
DECODE_ENV = "QUANTNOISE_QNZ_DECODE"


def qnz_config(meta: dict, arg_overrides: Optional[dict] = None):
    """The OmegaConf config of a .qnz (stock arch), with fairseq's overrides and upgrades applied."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    state = stock_checkpoint({}, meta)
    state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    if arg_overrides is not None:
        overwrite_args_by_name(state["cfg"], arg_overrides)
    return checkpoint_utils._upgrade_state_dict(state)["cfg"]


def _setup_task(cfg):
    from fairseq import tasks

    try:
        return tasks.setup_task(cfg.task, from_checkpoint=True)
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f"cannot set up the model's task from data {getattr(cfg.task, 'data', None)!r} ({e}); "
                         f"pass the folder holding the dictionary the model was trained with (data=... / "
                         f"fairseq's DATA argument)") from None


def _fix_non_state(model: nn.Module) -> None:
    """Tensors the build made on ``meta`` that no state dict holds, attention routing, the decoder layers' lean step."""
    for m in model.modules():
        if isinstance(m, SinusoidalPositionalEmbedding) and m.weights.is_meta:
            if type(m) is SinusoidalPositionalEmbedding:
                LazySinusoidalPositionalEmbedding.from_meta_(m)
            else:  # a subclass with its own forward: the full table, as fairseq builds it
                m.weights = m.get_embedding(m.weights.shape[0], m.embedding_dim, m.padding_idx)
    use_lean_step(model, (RuntimeMixin,))


def use_lean_step(model: nn.Module, wrapped_by: Optional[tuple] = None) -> nn.Module:
    """Attention that calls its projection modules (``route_attention``; with ``wrapped_by``, only where a
    projection is one of these classes), with the fused kernel and the lean incremental step, and decoder layers
    with the lean step (``LeanDecoderStep``) where the class keeps fairseq's forward.  The runtime's models get it
    when loaded; ``benchmarks/infer.py``
    gives it to the fp32 model too (case ``fp32-lean``), to show what it buys without compression."""
    route_attention(model, wrapped_by)  # call the projection modules, not F.multi_head_attention_forward
    for m in model.modules():
        if isinstance(m, TransformerDecoderLayerBase) and not isinstance(m, LeanDecoderStep) \
                and type(m).forward is TransformerDecoderLayerBase.forward:  # own forward (Aug...): its arguments differ
            m.__class__ = _lean_layer(type(m))
    return model


class LazySinusoidalPositionalEmbedding(SinusoidalPositionalEmbedding):
    """fairseq's sinusoidal position table, computed only as far as the inputs reach.  fairseq computes it
    at build time for every position the model allows (max positions x dim fp32: 4 MiB for a 1024-d LM with
    1024 positions, 16% of its pq ``.qnz``), though its forward already regrows the table when a longer input
    arrives.  This one starts with ``INITIAL_POSITIONS`` rows and, before fairseq's forward, grows the table
    to at least double (so generation, one position longer each step, recomputes it log(n) times, not n), never
    beyond the size fairseq would have built unless an input needs more.  Row p of the table does not depend
    on its size: outputs are fairseq's, bit for bit."""

    INITIAL_POSITIONS = 64

    @classmethod
    def from_meta_(cls, m: SinusoidalPositionalEmbedding) -> None:
        """Swap the class of a table built on ``meta`` in place; compute its first rows on the CPU."""
        m.__class__ = cls
        m.built_size = m.weights.shape[0]
        rows = min(m.built_size, m.padding_idx + 1 + cls.INITIAL_POSITIONS)
        m.weights = m.get_embedding(rows, m.embedding_dim, m.padding_idx)

    def forward(self, input, incremental_state=None, timestep=None, positions=None):
        need = self.padding_idx + 1 + input.size(1)  # what fairseq's forward needs: (bsz, seq_len) input
        have = self.weights.size(0)
        if need > have:
            rows = max(need, min(2 * have, self.built_size))
            self.weights = self.get_embedding(rows, self.embedding_dim, self.padding_idx).to(self.weights)
        return super().forward(input, incremental_state, timestep, positions)


class LeanDecoderStep:
    """A fairseq decoder layer whose incremental step (generation: eval, a decoder-only model, nothing but
    attention, residuals, layer norms and the FFN in the layer) runs without the branches and module calls of
    fairseq's forward that do nothing there (dropouts, optional norms and scales): the same operations in the
    same order (outputs equal).  Mixed into the layer's own class by ``_lean_layer``; anything else goes to
    fairseq's forward."""

    def forward(self, x, encoder_out=None, encoder_padding_mask=None, incremental_state=None,
                prev_self_attn_state=None, prev_attn_state=None, self_attn_mask=None, self_attn_padding_mask=None,
                need_attn=False, need_head_weights=False):
        if (incremental_state is None or self.training or encoder_out is not None or prev_self_attn_state is not None
                or self.cross_self_attention or self.c_attn is not None or self.attn_ln is not None
                or self.ffn_layernorm is not None or self.w_resid is not None or self.onnx_trace
                or self.dropout_module.apply_during_inference or self.activation_dropout_module.apply_during_inference
                or type(self).residual_connection is not TransformerDecoderLayerBase.residual_connection):
            return super().forward(x, encoder_out, encoder_padding_mask, incremental_state, prev_self_attn_state,
                                   prev_attn_state, self_attn_mask, self_attn_padding_mask, need_attn, need_head_weights)
        pre = self.normalize_before
        h = self.self_attn_layer_norm(x) if pre else x
        h, _ = self.self_attn(query=h, key=h, value=h, key_padding_mask=self_attn_padding_mask,
                              incremental_state=incremental_state, need_weights=False, attn_mask=self_attn_mask)
        x = h + x
        if not pre:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if pre else x
        x = self.fc2(self.activation_fn(self.fc1(h))) + x
        if not pre:
            x = self.final_layer_norm(x)
        return x, None, None


def _lean_layer(cls: type) -> type:
    return mixed_class(LeanDecoderStep, cls, f"Lean{cls.__name__}", globals())


for _cls in (TransformerDecoderLayerBase, TransformerDecoderLayer):  # fairseq's own: defined at import (pickle)
    _lean_layer(_cls)


class RuntimeLearnedPositions(LearnedPositionalEmbedding):
    """fairseq's learned position embedding over a runtime embedding (``rows``: pq codes / int weights, rows
    decoded as they are looked up) instead of a decoded fp32 table (positions x dim: 1.5 MiB for roberta_base's
    514 x 768, 10% of its pq ``.qnz``).  Its forward computes the positions as fairseq's does, then looks them up.
    ``from_meta_`` swaps the class of a table built on ``meta`` in place and renames the .qnz's layer to ``rows``."""

    @classmethod
    def from_meta_(cls, m: nn.Module, meta: dict, name: str, tensors: dict) -> None:
        if type(m) is not LearnedPositionalEmbedding or name not in meta["layers"] or m.max_norm is not None:
            return
        m._parameters.pop("weight")
        m.__class__ = cls
        m.rows = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, device="meta")
        meta["layers"][f"{name}.rows"] = meta["layers"].pop(name)
        for key in [k for k in tensors if k.startswith(f"{name}.")]:
            tensors[f"{name}.rows.{key[len(name) + 1:]}"] = tensors.pop(key)

    @property
    def weight(self):
        return self.rows.weight

    def forward(self, input, incremental_state=None, positions=None):
        assert positions is None or self.padding_idx is None, \
            "If positions is pre-computed then padding_idx should not be set."
        if positions is None:
            if incremental_state is not None:  # the same position for every token of one decoding step
                positions = torch.zeros((1, 1), device=input.device, dtype=input.dtype).fill_(
                    int(self.padding_idx + input.size(1)))
            else:
                positions = fairseq_utils.make_positions(input, self.padding_idx, onnx_trace=self.onnx_trace)
        return self.rows(positions)


class RuntimeLMHead(RobertaLMHead):
    """RoBERTa's LM head with its output projection as a module: a runtime Linear sharing the stored codes /
    int weight of the tied token embedding (fairseq's head reads ``F.linear(x, self.weight)``, which would need
    a decoded fp32 copy: vocabulary x dim, 154 MB for roberta_base's 50k words).  ``from_head_`` swaps the class of
    a head built on ``meta`` in place and points the .qnz's alias at ``proj``."""

    @classmethod
    def from_head_(cls, head: nn.Module, meta: dict, name: str) -> None:
        target = meta["aliases"].get(f"{name}.weight")
        if type(head) is not RobertaLMHead or target not in meta["layers"]:
            return
        out, inn = head._parameters.pop("weight").shape
        head.__class__ = cls
        head.proj = nn.Linear(inn, out, bias=False, device="meta")
        meta["aliases"][f"{name}.proj.weight"] = meta["aliases"].pop(f"{name}.weight")

    @property
    def weight(self):
        return self.proj.weight

    def forward(self, features, masked_tokens=None, **kwargs):
        if masked_tokens is not None:
            features = features[masked_tokens, :]
        return self.proj(self.layer_norm(self.activation_fn(self.dense(features)))) + self.bias


def load_model(path, data: Optional[str] = None, decoded: bool = False, arg_overrides: Optional[dict] = None,
               task=None):
    """(model, cfg, task) of a .qnz: compressed runtime layers, or (``decoded``) the plain fp32 model."""
    overrides = dict(arg_overrides or {})
    if data is not None:
        overrides["data"] = str(data)
    def unbuildable(e: Exception) -> SystemExit:  # the file's config, which fairseq / omegaconf reject their own ways
        return SystemExit(f"error: {path}: its fairseq config does not build a model ({type(e).__name__}: "
                          f"{_first_line(e)}); re-export it from a checkpoint this fairseq loads")

    if decoded:  # fairseq's own loader (the .qnz decoded by qn_fairseq/ipq.py's load_checkpoint_to_cpu)
        try:
            models, cfg, task = _original()([str(path)], arg_overrides=overrides, task=task)
        except (FileNotFoundError, OSError) as e:
            raise SystemExit(f"error: {path}: {_first_line(e)}") from None
        except Exception as e:  # noqa: BLE001
            raise unbuildable(e) from None
        return models[0].eval(), cfg, task
    try:
        tensors, meta = read_qnz(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    release_freed_memory()  # the checks' temporaries (unpacked int4 chunks...) would stay resident on the heap

    try:
        cfg = qnz_config(meta, overrides)
    except Exception as e:  # noqa: BLE001
        raise unbuildable(e) from None
    if task is None:
        try:
            task = _setup_task(cfg)
        except ValueError as e:  # no dictionary at the data path
            raise SystemExit(f"error: {path}: {_first_line(e)}") from None
        except Exception as e:  # noqa: BLE001
            raise unbuildable(e) from None
    try:
        with torch.device("meta"), _meta_stays_meta():
            model = task.build_model(cfg.model, from_checkpoint=True)
    except Exception as e:  # noqa: BLE001
        raise unbuildable(e) from None
    _fix_non_state(model)
    for name, m in list(model.named_modules()):
        RuntimeLMHead.from_head_(m, meta, name)
        RuntimeLearnedPositions.from_meta_(m, meta, name, tensors)
    try:
        fill_model_(model, tensors, meta)
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None
    _fix_non_state(model)
    model.set_num_updates(int((meta.get("fairseq") or {}).get("num_updates", 0)))
    logger.info("loaded %s compressed: %s", path, runtime_summary(model))
    return model, cfg, task


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


_META = threading.local()  # per thread: how many _meta_stays_meta contexts are open
_META_LOCK = threading.Lock()
_META_USERS = [0, None]  # open contexts in the process; torch.Tensor.cpu before the first


@contextlib.contextmanager
def _meta_stays_meta():
    """While the model is built on ``meta``: ``meta_tensor.cpu()`` stays on meta.  fairseq's
    ``init_bert_params`` (RoBERTa) draws its init as ``data.copy_(data.cpu().normal_(...))``, which
    raises on meta ("Cannot copy out of meta tensor"); the values are overwritten by the file anyway.
    Thread-safe: ``torch.Tensor.cpu`` is patched while any thread is inside (restored by the last to leave),
    and acts only in the threads that are."""
    with _META_LOCK:
        if _META_USERS[0] == 0:
            original = _META_USERS[1] = torch.Tensor.cpu

            def cpu(self, *args, **kwargs):
                if self.is_meta and getattr(_META, "depth", 0):
                    return self
                return original(self, *args, **kwargs)

            torch.Tensor.cpu = cpu
        _META_USERS[0] += 1
    _META.depth = getattr(_META, "depth", 0) + 1
    try:
        yield
    finally:
        _META.depth -= 1
        with _META_LOCK:
            _META_USERS[0] -= 1
            if _META_USERS[0] == 0:
                torch.Tensor.cpu = _META_USERS[1]


def _original():
    from fairseq import checkpoint_utils

    fn = checkpoint_utils.load_model_ensemble_and_task
    return getattr(fn, "quantnoise_original", fn)


def _install() -> None:
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_model_ensemble_and_task
    if getattr(original, "quantnoise_original", None):
        return

    def load_model_ensemble_and_task(filenames, arg_overrides=None, task=None, strict=True, suffix="",
                                     num_shards=1, state=None):
        if state is not None or os.environ.get(DECODE_ENV) or not any(str(f).endswith(".qnz") for f in filenames):
            return original(filenames, arg_overrides, task, strict, suffix, num_shards, state)
        ensemble, cfg = [], None
        for f in filenames:
            if str(f).endswith(".qnz"):
                if not os.path.isfile(str(f)):
                    raise IOError(f"Model file not found: {f}")
                model, cfg, task = load_model(f, arg_overrides=arg_overrides, task=task)
                ensemble.append(model)
            else:
                models, cfg, task = original([f], arg_overrides, task, strict, suffix, num_shards)
                ensemble.extend(models)
        return ensemble, cfg, task

    load_model_ensemble_and_task.quantnoise_original = original
    checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task


_install()
