"""Issue 35's recipe row: a small Llama trained in transformers' ``Trainer``, served as Q4_0 three ways.

    python recipes/gguf/q4_0.py TRAIN.txt VALID.txt TEST.txt OUTDIR [--layers 4 --dim 256 --steps 2000 --p 0.5]
                               [--seed 1] [--record results/gguf_q4_0.json]
    python recipes/gguf/q4_0.py ... OUTDIR --tiny      # 1 x 64, a few steps: that it runs, not a figure

Arms, the same model, seed, data order and schedule (``--steps`` updates of AdamW, cosine, batch ``--batch`` blocks
of ``--block`` tokens):
  - ``q4_0 post hoc``: trained plain, then every Linear put on llama.cpp's Q4_0 (``save_gguf(grid="q4_0")``: the
    bytes ``llama-quantize`` would write, quantnoise.grids being bit-identical to it);
  - ``quant-noise q4_0``: trained with Quant-Noise on the q4_0 grid (``QuantNoiseConfig(scheme="scalar",
    grid="q4_0", p=--p)`` on every Linear, ``QuantNoiseCallback``), written as Q4_0;
  - ``QAT q4_0``: the same at p = 1 (every block on the grid on every forward).
The embedding stays F32 in all three (so the arms differ only in how the Linears met the grid).  TEST perplexity
(never read before the end; VALID is not used for choices here) over non-overlapping blocks of ``--block`` tokens:
fp32 (the trained weights), the PyTorch model on the grid (``compress_`` with ``LayerRule(grid="q4_0")``: what
quantnoise computes; its runtime does not hold grid layers, a ``.qnz`` stores one scale per row) and llama.cpp
itself on the GGUF (llama-cpp-python, F32 KV cache; ``make peers`` installs it, else that column says so).
The tokenizer: a byte-level BPE of ``--vocab`` tokens trained on TRAIN (nothing downloaded).
"""
from __future__ import annotations

import argparse
import copy
import math
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks import harness  # noqa: E402

LINEARS = r"layers\.\d+\.(self_attn|mlp)\.|lm_head"  # every Linear; the embedding and norms stay fp32 / F32
ARMS = ("q4_0 post hoc", "quant-noise q4_0", "QAT q4_0")


def tokenizer_of(train: pathlib.Path, vocab: int):
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(train)], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def blocks_of(path: pathlib.Path, tok, block: int):
    """The file's lines as one token stream (</s> after each line), cut into (n, block + 1) overlapping-by-one rows:
    a row's first ``block`` tokens are the input, its last ``block`` the targets."""
    import torch

    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids += tok(line.strip())["input_ids"] + [tok.eos_token_id]
    n = (len(ids) - 1) // block
    if n < 1:
        raise SystemExit(f"{path} holds {len(ids)} tokens, fewer than one block of {block} + 1: use a longer file "
                         f"or a smaller --block")
    t = torch.tensor(ids[: n * block + 1])
    return torch.stack([t[i * block: (i + 1) * block + 1] for i in range(n)])


def llama(args, vocab: int):
    import torch
    import transformers as tf

    torch.manual_seed(args.seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=args.dim, intermediate_size=args.ffn or 4 * args.dim,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.dim // 64),
                         num_key_value_heads=max(1, args.dim // 64), max_position_embeddings=max(256, args.block),
                         rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg)


def train(arm: str, args, vocab: int, train_rows, out: pathlib.Path):
    import torch
    import transformers as tf

    from quantnoise import QuantNoiseConfig, quantize_, unquantize_
    from quantnoise.hf import QuantNoiseCallback

    model = llama(args, vocab)
    callbacks = []
    if arm != "q4_0 post hoc":
        p = 1.0 if arm.startswith("QAT") else args.p
        quantize_(model, QuantNoiseConfig(scheme="scalar", grid="q4_0", p=p, block_size=args.noise_block,
                                          include=LINEARS, seed=args.seed))
        callbacks.append(QuantNoiseCallback())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(train_rows)

        def __getitem__(self, i):
            r = train_rows[i][:-1]
            return {"input_ids": r, "labels": r.clone()}

    targs = tf.TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), weight_decay=0.01,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    tf.Trainer(model=model, args=targs, train_dataset=Rows(), callbacks=callbacks).train()
    model.eval()
    plain = copy.deepcopy(model)
    unquantize_(plain)
    return model, plain  # (as trained: wrappers on the grid; the plain fp32 weights)


def nll_torch(model, rows) -> float:
    """Mean next-token NLL over the rows (each: ``block`` inputs, ``block`` targets)."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(r[:-1].unsqueeze(0)).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits.float(), r[1:], reduction="sum"))
            n += r.numel() - 1
    return total / n


def nll_llama_cpp(path: pathlib.Path, rows, block: int) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=block, n_batch=block, n_threads=1,
                          n_threads_batch=1, type_k=0, type_v=0, seed=0, verbose=False)  # type 0: F32 KV cache
    total, n = 0.0, 0
    for r in rows:
        llm.reset()
        llm.eval(r[:-1].tolist())
        logits = np.array(llm.scores[:block], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        total += float((logz - logits[np.arange(block), r[1:].numpy()]).sum())
        n += block
    return total / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("train", "valid", "test", "outdir"):
        p.add_argument(name, type=pathlib.Path)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=0, help="FFN width (0: 4 x dim)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--p", type=float, default=0.5, help="the Quant-Noise arm's noise rate")
    p.add_argument("--noise-block", type=int, default=8, help="the noise's block size (weights per masked block)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-test-blocks", type=int, default=0, help="0: every TEST block")
    p.add_argument("--tiny", action="store_true", help="1 x 64, vocabulary 300, block 32, 4 steps: that it runs")
    harness.add_record_arg(p, "gguf_q4_0")
    a = p.parse_args()
    if a.tiny:
        a.layers, a.dim, a.vocab, a.block, a.batch, a.steps, a.max_test_blocks = 1, 64, 300, 32, 2, 4, 4
    if a.dim % 32:
        raise SystemExit(f"--dim {a.dim} is not a multiple of 32: Q4_0 has one scale per 32 inputs")
    import torch

    from quantnoise import LayerRule, compress_
    from quantnoise.hf.gguf import save_gguf

    torch.set_num_threads(1)
    a.outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = tokenizer_of(a.train, a.vocab)
    vocab = max(a.vocab, len(tok))
    train_rows, test_rows = blocks_of(a.train, tok, a.block), blocks_of(a.test, tok, a.block)
    if a.max_test_blocks:
        test_rows = test_rows[: a.max_test_blocks]
    try:
        import llama_cpp  # noqa: F401
        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
    rows = []
    for arm in ARMS:
        trained, plain = train(arm, a, vocab, train_rows, a.outdir / arm.replace(" ", "_"))
        gguf = a.outdir / f"{arm.replace(' ', '_')}.gguf"
        save_gguf(trained, gguf, tokenizer=tok, grid="q4_0")  # wrappers: their grid; plain Linears: Q4_0 post hoc
        on_grid = copy.deepcopy(plain)
        compress_(on_grid, LayerRule(pattern=LINEARS, scheme="scalar", grid="q4_0"))
        row = {"arm": arm, "fp32_ppl": math.exp(nll_torch(plain, test_rows)),
               "q4_0_torch_ppl": math.exp(nll_torch(on_grid, test_rows)), "gguf_bytes": gguf.stat().st_size,
               "q4_0_llama_cpp_ppl": math.exp(nll_llama_cpp(gguf, test_rows, a.block)) if have_llama_cpp else None}
        rows.append(row)
        print(row, flush=True)
    print(f"\nLlama {a.layers}x{a.dim}, vocabulary {vocab}, {a.steps} steps of {a.batch} x {a.block} tokens, "
          f"seed {a.seed}; TEST perplexity over {len(test_rows)} blocks of {a.block}; {time.time() - t0:.0f} s")
    print("| arm | fp32 | Q4_0 in PyTorch | Q4_0 in llama.cpp | GGUF bytes |\n|---|---|---|---|---|")
    for r in rows:
        cpp = "not installed (make peers)" if r["q4_0_llama_cpp_ppl"] is None else f"{r['q4_0_llama_cpp_ppl']:.2f}"
        print(f"| {r['arm']} | {r['fp32_ppl']:.2f} | {r['q4_0_torch_ppl']:.2f} | {cpp} | {r['gguf_bytes']} |")
    cfg = {k: getattr(a, k) for k in ("layers", "dim", "ffn", "block", "batch", "steps", "lr", "p", "noise_block",
                                      "seed", "tiny")}
    harness.save("gguf_q4_0", {"config": {**cfg, "vocab": vocab, "test_blocks": len(test_rows)}, "rows": rows},
                 a.record, threads=1)


if __name__ == "__main__":
    main()
