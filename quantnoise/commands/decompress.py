"""``quantnoise decompress MODEL.qnz -o ckpt.pt``: an ordinary fairseq checkpoint for stock fairseq.

Weights are codebook[codes] (pq) or q * scale (int-N) exactly, in fp32; the arch is the stock one
(qn_transformer_lm -> transformer_lm, ...), so fairseq-eval-lm / fairseq-generate /
``from_pretrained`` load it without ``--user-dir``."""
from ..checkpoint import check_output, save_checkpoint, stock_checkpoint
from ..export import load_qnz


def add_parser(sub) -> None:
    p = sub.add_parser("decompress", help="turn a .qnz into an ordinary fairseq checkpoint (stock arch)")
    p.add_argument("model", help=".qnz file")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    p.add_argument("--arch", default=None, help="stock arch name to write (default: the plugin arch without 'qn_')")
    p.set_defaults(func=run)


def run(args) -> int:
    check_output(args.output)
    state, meta = load_qnz(args.model)
    save_checkpoint(stock_checkpoint(state, meta, arch=args.arch), args.output)
    print(f"wrote {args.output}")
    return 0
