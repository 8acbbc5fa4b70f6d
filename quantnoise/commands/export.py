"""``quantnoise export CKPT -o MODEL.qnz``: write the compressed model (see quantnoise/export.py)."""
from ..checkpoint import check_output, load_checkpoint
from ..export import ExportOptions, save_qnz


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a quantized checkpoint as a compressed .qnz file")
    p.add_argument("checkpoint", help="checkpoint from `quantnoise quantize` or fairseq-train with --ipq-plan")
    p.add_argument("-o", "--output", required=True, help=".qnz file to write (atomically)")
    p.add_argument("--rest", choices=["float16", "float32"], default="float16",
                   help="dtype of the tensors that are not quantized (biases, norms, ...)")
    p.add_argument("--centroids", choices=["float16", "float32", "int8"], default="float16",
                   help="pq codebooks in fp16, in fp32 (exactly the model's), or int8 with one scale per layer "
                        "(iPQ + int8)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not str(args.output).endswith(".qnz"):
        raise ValueError(f"output {args.output!r} must end in .qnz (the suffix the plugin loads by)")
    check_output(args.output)
    state = load_checkpoint(args.checkpoint)
    hist = state.get("optimizer_history") or [{}]
    fairseq = {"cfg": state.get("cfg"), "num_updates": int(hist[-1].get("num_updates", 0))}
    meta = save_qnz(args.output, state["model"], fairseq, ExportOptions(args.rest, args.centroids))
    print(f"wrote {args.output}: {len(meta['layers'])} compressed layers, {len(meta['dense'])} other tensors")
    return 0
