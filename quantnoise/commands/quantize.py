"""``quantnoise quantize CKPT -o OUT.pt``: post-hoc iPQ (or int-N) of a fairseq checkpoint.

The output is a fairseq checkpoint whose quantized layers are stored as codes + centroids (the
plugin loads them as PQ layers with trainable centroids, e.g. to fine-tune with ``fairseq-train
--restore-file OUT.pt --reset-optimizer``); the arch is renamed to the plugin's (qn_*) and the
optimizer state is dropped (it no longer matches the parameters).
"""
import argparse
import logging

from tqdm import tqdm

from ..checkpoint import check_output, load_checkpoint, model_name, plugin_arch, save_checkpoint, set_model_name
from ..compress.layers import LayerRule
from ..compress.plan import IPQPlan, load_plan, quantize_state_dict

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="iPQ / int-N quantize the layers of a fairseq checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt)")
    p.add_argument("-o", "--output", required=True, help="quantized checkpoint to write (.pt)")
    p.add_argument("--config", help="ipq plan YAML (stages of {pattern, scheme, block_size, n_centroids, bits, rows_per_scale}; "
                                    "a bit plan of quantnoise.compress.bitplan); "
                                    "overrides the single-setting flags below")
    p.add_argument("--scheme", choices=["pq", "scalar"], default="pq", help="pq (iPQ) or scalar (int-N)")
    p.add_argument("--block-size", type=int, default=8, help="pq: weights per block")
    p.add_argument("--centroids", type=int, default=256, help="pq: centroids per layer (<= 256: one-byte codes)")
    p.add_argument("--bits", type=int, default=8, help="scalar: integer bits, 2..8")
    p.add_argument("--rows-per-scale", type=int, default=1,
                   help="scalar: consecutive output rows sharing one scale (1 = per row; head_dim = per attention head; 0 = one per tensor)")
    p.add_argument("--iters", type=int, default=20, help="pq: k-means iterations")
    p.add_argument("--include", default=".", help="regex of layer names to quantize (default: every Linear/Embedding/Conv)")
    p.add_argument("--exclude", default=None, help="regex of layer names to leave in full precision")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (plus a hash of each layer name)")
    p.set_defaults(func=run)


def plan_from_args(args) -> IPQPlan:
    if args.config:
        return load_plan(args.config)
    rule = LayerRule(pattern=args.include, scheme=args.scheme, block_size=args.block_size,
                     n_centroids=args.centroids, bits=args.bits, kmeans_iters=args.iters, exclude=args.exclude,
                     rows_per_scale=args.rows_per_scale)
    return IPQPlan(stages=[rule], seed=args.seed)


def run(args) -> int:
    plan = plan_from_args(args)
    check_output(args.output)
    state = load_checkpoint(args.checkpoint)
    # a progress bar on a terminal only (disable=None): logs and pipes get no bar fragments
    bar = lambda it: tqdm(list(it), desc="quantize", unit="layer", leave=False, disable=None)  # noqa: E731
    state["model"], names = quantize_state_dict(state["model"], plan, progress=bar)
    state.pop("last_optimizer_state", None)
    if state.get("cfg"):
        set_model_name(state["cfg"], plugin_arch(model_name(state["cfg"])))
    state["quantnoise"] = {"ipq_layers": names}
    save_checkpoint(state, args.output)
    logger.info("quantized %d layers of %s -> %s", len(names), args.checkpoint, args.output)
    return 0
