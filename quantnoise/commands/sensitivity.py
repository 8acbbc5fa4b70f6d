"""``quantnoise sensitivity CKPT DATA``: Q-BERT per-layer Hessian sensitivity of a fairseq checkpoint,
and optionally a mixed-precision bit plan for ``quantnoise quantize --config``.

Prints one row per Linear / Embedding layer, most sensitive first: weights, mean and std over the
batches of the dominant Hessian eigenvalue's magnitude, and the score mean + std (Shen et al. 2020).
With ``-o plan.yaml`` and a budget (``--avg-bits`` or ``--budget-mb``), writes the bit plan that
minimises sum(score * weights * 4^-bits) under it (exact knapsack, quantnoise.compress.bitplan), each width
costing the bits a .qnz stores it in (``export.pack_width``: int3 3 bits).  ``--cost measured`` replaces the
4^-bits model by each layer's measured squared quantization error ||W - Q_b(W)||^2 under the plan's quantizer
(one scale per row, ``--clip``; Q-BERT / HAWQ-V2): the model ignores the weights' scale and the clip.
"""
import argparse
import importlib
import pathlib

from ..compress.bitplan import allocate_bits
from ..checkpoint import check_output
from ..compress.sensitivity import format_table
from ..export import pack_width


def add_parser(sub) -> None:
    p = sub.add_parser("sensitivity", help="Q-BERT Hessian sensitivity per layer of a fairseq checkpoint (+ bit plan)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt), or a .qnz of one (scored decoded)")
    p.add_argument("data", help="data-bin folder of the checkpoint's task (dictionary and the --subset split)")
    p.add_argument("--subset", default="valid", help="data split whose first batches are used")
    p.add_argument("--batches", type=int, default=4, help="batches (score = mean + std over them)")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens per batch")
    p.add_argument("--layers", default=None, help="regex of layer names (default: every Linear and Embedding)")
    p.add_argument("--iters", type=int, default=20, help="power iterations per layer and batch, at most")
    p.add_argument("--tol", type=float, default=1e-3, help="relative change of the eigenvalue that stops them")
    p.add_argument("--seed", type=int, default=0, help="seed of the start vectors")
    p.add_argument("-o", "--output", help="bit plan YAML to write (needs --avg-bits or --budget-mb)")
    p.add_argument("--avg-bits", type=float, help="plan budget: stored bits per weight of the scored layers")
    p.add_argument("--budget-mb", type=float, help="plan budget: MB (10^6 bytes) of the scored layers' weights")
    p.add_argument("--bits", default="2,3,4,8", help="allowed widths, comma-separated")
    p.add_argument("--cost", choices=("model", "measured"), default="model",
                   help="plan cost per layer and width: score x weights x 4^-bits (model) or score x the measured "
                        "squared error of the quantizer (measured)")
    p.add_argument("--clip", choices=("minmax", "mse"), default="minmax",
                   help="the plan's scales (written to its YAML; what --cost measured measures)")
    p.set_defaults(func=run)


def _plugin_module():
    """qn_fairseq.sensitivity, imported as fairseq's --user-dir imports the plugin (``user_dir.import_plugin``)."""
    from .user_dir import import_plugin

    import_plugin()
    return importlib.import_module("qn_fairseq.sensitivity")


def run(args) -> int:
    if not pathlib.Path(args.checkpoint).is_file():
        raise OSError(f"checkpoint {args.checkpoint} does not exist; pass a checkpoint_*.pt written by fairseq-train")
    if not pathlib.Path(args.data).is_dir():
        raise OSError(f"data folder {args.data} does not exist or is not a folder; pass the checkpoint's data-bin folder")
    try:
        widths = [int(b) for b in args.bits.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--bits {args.bits!r} is invalid; use comma-separated integers, e.g. 2,3,4,8") from None
    if args.output:
        if (args.avg_bits is None) == (args.budget_mb is None):
            raise ValueError("-o/--output writes a bit plan: give exactly one of --avg-bits or --budget-mb")
        check_output(args.output)  # before the long computation, as is the budget where it can be
        if args.avg_bits is not None:
            allocate_bits({"all": 1.0}, {"all": 1}, bits=widths, avg_bits=args.avg_bits, bit_cost=pack_width)
    elif args.avg_bits is not None or args.budget_mb is not None:
        raise ValueError("--avg-bits / --budget-mb set a bit plan's budget: also pass -o plan.yaml")
    elif args.cost != "model" or args.clip != "minmax":
        raise ValueError("--cost / --clip set how a bit plan is made: also pass -o plan.yaml and a budget")
    scores = _plugin_module().checkpoint_sensitivity(
        args.checkpoint, args.data, subset=args.subset, batches=args.batches, max_tokens=args.max_tokens,
        layers=args.layers, iters=args.iters, tol=args.tol, seed=args.seed)
    plan = None
    if args.output:
        errors = None
        if args.cost == "measured":
            errors = _plugin_module().checkpoint_quant_errors(args.checkpoint, args.data, list(scores), widths, args.clip)
        plan = allocate_bits({n: s.score for n, s in scores.items()}, {n: s.numel for n, s in scores.items()},
                             bits=widths, avg_bits=args.avg_bits, bit_cost=pack_width,  # what a .qnz stores: int3 in 3 bits
                             budget_bytes=None if args.budget_mb is None else args.budget_mb * 1e6, errors=errors)
        plan.save_yaml(args.output, {n: s.score for n, s in scores.items()}, clip=args.clip)
    print(format_table(scores, plan.bits if plan else None))
    if plan:
        print(f"plan: {plan.avg_bits:.3f} bits per weight ({plan.used_bits / 8e6:.3f} MB of weights, {plan.cost} cost) "
              f"-> {args.output}")
    return 0
