"""Q-BERT Hessian sensitivity (quantnoise.compress.sensitivity) of a fairseq checkpoint on its own task's data:
the model and task come from the checkpoint, the loss is the checkpoint's criterion per sample
(loss / sample_size), the batches the first ``batches`` of a data split in fairseq's order."""
import itertools
import logging
from typing import Dict, Sequence, Union

from quantnoise.compress.sensitivity import SensitivityScore, hessian_sensitivity

logger = logging.getLogger(__name__)


def load_checkpoint_model(path, data):
    """(fp32 model in eval mode, cfg, task) of a fairseq checkpoint (or .qnz, decoded: the Linear / Embedding
    layers in float)."""
    from fairseq import checkpoint_utils

    from .runtime import load_model

    try:
        if str(path).endswith(".qnz"):  # decoded: the Hessians need the fp32 Linear / Embedding layers, not runtime ones
            model, cfg, task = load_model(path, data=data, decoded=True)
        else:
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
            model = models[0]
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f"cannot load {path} with data {data} ({str(e).splitlines()[0]}); pass a fairseq checkpoint "
                         f"and the data-bin folder it was trained on") from None
    return model.float().eval(), cfg, task


def load_for_sensitivity(path, data, subset: str = "valid", batches: int = 4, max_tokens: int = 1024, seed: int = 0):
    """(model in eval mode, criterion, list of samples) of a fairseq checkpoint (or .qnz, decoded)."""
    from fairseq import utils

    model, cfg, task = load_checkpoint_model(path, data)
    try:
        task.load_dataset(subset)
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f"data split {subset!r} is not in {data} ({str(e).splitlines()[0]}); pass --subset "
                         f"train|valid|test of that folder") from None
    criterion = task.build_criterion(cfg.criterion)
    itr = task.get_batch_iterator(
        dataset=task.dataset(subset), max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, seed=seed, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    samples = list(itertools.islice(itr, batches))
    return model, criterion, samples


def checkpoint_sensitivity(path, data, subset: str = "valid", batches: int = 4, max_tokens: int = 1024,
                           layers: Union[None, str, Sequence[str]] = None, iters: int = 20, tol: float = 1e-3,
                           seed: int = 0) -> Dict[str, SensitivityScore]:
    """{layer: SensitivityScore} of every Linear / Embedding of the checkpoint's model (or ``layers``)."""
    if batches < 1:
        raise ValueError(f"--batches {batches} is invalid; use at least 1 (Q-BERT's std needs several)")
    model, criterion, samples = load_for_sensitivity(path, data, subset, batches, max_tokens, seed)

    def loss_fn(m, sample):
        loss, sample_size, _ = criterion(m, sample)
        return loss / max(1, sample_size)

    logger.info("sensitivity of %s on %d %s batches", path, len(samples), subset)
    return hessian_sensitivity(model, loss_fn, samples, layers=layers, iters=iters, tol=tol, seed=seed)


def checkpoint_quant_errors(path, data, layers: Sequence[str], bits: Sequence[int], clip: str = "minmax"):
    """{layer: {b: ||W - Q_b(W)||^2}} of the checkpoint's ``layers`` under the scalar quantizer a plan is
    applied with (one scale per row, ``clip``): the measured cost of ``allocate_bits(errors=...)``."""
    from quantnoise.compress.bitplan import quant_errors

    model, _, _ = load_checkpoint_model(path, data)
    return {n: quant_errors(model.get_submodule(n).weight, bits, clip=clip) for n in layers}
