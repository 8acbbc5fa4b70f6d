"""Issue 18's goals on Hugging Face models loaded compressed by ``quantnoise.hf.from_pretrained``.

    python benchmarks/hf.py WORKDIR [--rounds 5] [--sentences 16] [--new-tokens 32] [--skip-gpt2] [--skip-rss]
                               [--table-too]

  1. prepare (once, cached in WORKDIR): all-MiniLM-L6-v2 (``quantnoise.hf.load_encoder()``, offline) with every
     Linear and Embedding as pq b=8 k=256 (``compress_``, k-means 20 iterations), saved by ``hf.save_pretrained``
     to WORKDIR/minilm_pq; a GPT-2 12 x 768 built from ``GPT2Config()`` (random init, seed 0; speed does not depend
     on the values, so k-means runs 4 iterations) with every Conv1D / Linear / Embedding as pq b=8 k=256, to
     WORKDIR/gpt2_pq; the compressed models' outputs on fixed inputs (WORKDIR/*_ref.pt) for the match check;
  2. resident memory of loading, in a fresh process per folder, 1 thread: imports and a warm-up (load + forward of
     a 1-layer copy of the same architecture, freed) first, then VmRSS before / after ``from_pretrained``;
     growth / the .qnz's size (benchmarks/load_rss.py's protocol);
  3. speed, one process, 1 thread, rounds interleaved (fp32 then pq, ``--rounds`` times; the best round of each
     is reported): MiniLM batch-1 encode of ``--sentences`` sentences (12-32 tokens),
     GPT-2 batch-1 greedy ``generate`` of ``--new-tokens`` tokens after an 8-token prompt; the speed ratio is the
     median of the per-round ratios (fp32 time / pq time of the same round), the times the best rounds;
  4. the loaded models: layers left plain (decoded) and the largest difference to the compressed model's
     output, relative to its largest value.
Prints Markdown tables.  The machine's load average is printed with them (the machine may be shared).
"""
import argparse
import ctypes
import gc
import json
import os
import pathlib
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import harness  # noqa: E402
import torch  # noqa: E402

SENTENCE_LENGTHS = (12, 16, 20, 24, 28, 32, 16, 24)


def rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


def gpt2_config(layers=12, dim=768):
    import transformers as tf

    return tf.GPT2Config(n_layer=layers, n_embd=dim, n_head=max(1, dim // 64))


def minilm_inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1000, 30000, (1, n), generator=g) for n in SENTENCE_LENGTHS]


def prepare(work: pathlib.Path) -> None:
    import transformers as tf

    from quantnoise import LayerRule, compress_
    from quantnoise import hf

    torch.set_num_threads(2)
    if not (work / "minilm_pq" / "model.safetensors").is_file():
        model = hf.load_encoder().eval()
        compress_(model, LayerRule(pattern=".", block_size=8, n_centroids=256))
        hf.save_pretrained(model, work / "minilm_pq")
        with torch.no_grad():
            torch.save([model(ids).last_hidden_state for ids in minilm_inputs()[:2]], work / "minilm_ref.pt")
        tiny = tf.BertModel(tf.BertConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                          num_attention_heads=1, vocab_size=model.config.vocab_size))
        compress_(tiny, LayerRule(pattern=".", block_size=8, n_centroids=256, kmeans_iters=2))
        hf.save_pretrained(tiny.eval(), work / "minilm_warmup")
    if not (work / "gpt2_pq" / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(gpt2_config()).eval()
        compress_(model, LayerRule(pattern=".", block_size=8, n_centroids=256, kmeans_iters=4))
        hf.save_pretrained(model, work / "gpt2_pq")
        with torch.no_grad():
            torch.save([model(torch.arange(8).unsqueeze(0) + 100).logits], work / "gpt2_ref.pt")
        torch.manual_seed(0)
        tiny = tf.GPT2LMHeadModel(gpt2_config(1, 64)).eval()
        compress_(tiny, LayerRule(pattern=".", block_size=8, n_centroids=256, kmeans_iters=2))
        hf.save_pretrained(tiny, work / "gpt2_warmup")


def forward(model, kind):
    with torch.no_grad():
        if kind == "minilm":
            return model(minilm_inputs()[0]).last_hidden_state
        return model(torch.arange(8).unsqueeze(0) + 100).logits


def rss_child(folder: str, warmup: str, kind: str) -> None:
    """One fresh process: fixed RSS after imports + a freed warm-up load, then the load's growth."""
    torch.set_num_threads(1)
    from quantnoise import hf

    warm = hf.from_pretrained(warmup)
    forward(warm, kind)
    del warm
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss()
    model = hf.from_pretrained(folder)
    after = rss()
    forward(model, kind)
    print(json.dumps({"before": before, "after": after, "after_forward": rss(),
                      "qnz": os.path.getsize(pathlib.Path(folder) / "model.safetensors")}))


def timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def speed(work: pathlib.Path, rounds: int, sentences: int, new_tokens: int, skip_gpt2: bool,
          table_too: bool = False) -> dict:
    import transformers as tf

    from quantnoise import hf
    from quantnoise.runtime import CodesLinear, RuntimeMixin
    from transformers.pytorch_utils import Conv1D

    torch.set_num_threads(1)
    out = {}
    dense = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    cases = [("minilm", hf.load_encoder().eval(), hf.from_pretrained(work / "minilm_pq"))]
    if not skip_gpt2:
        torch.manual_seed(0)
        cases.append(("gpt2", tf.GPT2LMHeadModel(gpt2_config()).eval(), hf.from_pretrained(work / "gpt2_pq")))
    for kind, fp32, pq in cases:
        plain = [n for n, m in pq.named_modules() if isinstance(m, dense) and not isinstance(m, RuntimeMixin)]
        ref = torch.load(work / f"{kind}_ref.pt")[0]
        err = float((forward(pq, kind) - ref).abs().max() / ref.abs().max())
        if kind == "minilm":
            ids = [minilm_inputs()[i % len(SENTENCE_LENGTHS)] for i in range(sentences)]

            def run(model):
                with torch.no_grad():
                    for x in ids:
                        model(x)
        else:
            prompt = torch.arange(8).unsqueeze(0) + 100

            def run(model):
                with torch.no_grad():
                    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0)
        codes_layers = [m for m in pq.modules() if isinstance(m, CodesLinear)]

        def pq_kernel(kernel):  # "auto": what the runtime picks; "lut": every pq Linear by look-up table
            for m in codes_layers:
                m.kernel = kernel
            return pq

        run(fp32), run(pq)  # warm-up
        times = {"fp32": [], "pq": [], **({"pq_table": []} if table_too else {})}
        for _ in range(rounds):
            times["fp32"].append(timed(run, fp32))
            times["pq"].append(timed(run, pq_kernel("auto")))
            if table_too:
                times["pq_table"].append(timed(run, pq_kernel("lut")))
        pq_kernel("auto")

        def median_ratio(key):
            ratios = sorted(f / q for f, q in zip(times["fp32"], times[key]))
            return ratios[len(ratios) // 2]

        out[kind] = {"fp32_s": min(times["fp32"]), "pq_s": min(times["pq"]), "speedup": median_ratio("pq"),
                     "rounds": times, "plain_layers": plain, "rel_err": err,
                     "runtime_layers": sum(isinstance(m, RuntimeMixin) for m in pq.modules())}
        if table_too:
            out[kind].update(pq_table_s=min(times["pq_table"]), table_speedup=median_ratio("pq_table"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sentences", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--skip-rss", action="store_true", help="speed only (no resident-memory children)")
    p.add_argument("--table-too", action="store_true",
                   help="also time the pq model with every pq Linear on the look-up table (kernel='lut'), "
                        "interleaved in the same rounds")
    harness.add_record_arg(p, "hf")
    p.add_argument("--rss-child", nargs=3, metavar=("FOLDER", "WARMUP", "KIND"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rss_child:
        return rss_child(*a.rss_child)
    work = pathlib.Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    mib = 2 ** 20
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, 1 thread")
    print("\n| model | .qnz MiB | RSS growth after from_pretrained MiB (x .qnz) | after one forward MiB (x .qnz) |")
    print("|---|---|---|---|")
    rss_rows = []
    for kind in () if a.skip_rss else ("minilm",) + (() if a.skip_gpt2 else ("gpt2",)):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, __file__, a.workdir, "--rss-child", str(work / f"{kind}_pq"),
                              str(work / f"{kind}_warmup"), kind], capture_output=True, text=True, env=env, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        grow, fwd = r["after"] - r["before"], r["after_forward"] - r["before"]
        print(f"| {kind} pq b=8 k=256 | {r['qnz'] / mib:.2f} | {grow / mib:.2f} ({grow / r['qnz']:.2f}x) "
              f"| {fwd / mib:.2f} ({fwd / r['qnz']:.2f}x) |", flush=True)
        rss_rows.append({"model": kind, **r})
    res = speed(work, a.rounds, a.sentences, a.new_tokens, a.skip_gpt2, a.table_too)
    print("\n| model | task | fp32 s (best round) | pq s (best round) | pq speed / fp32 (median of rounds) | runtime layers | plain (decoded) layers | max rel. diff "
          "to the compressed model |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in res.items():
        task = f"batch-1 encode, {a.sentences} sentences" if kind == "minilm" else \
            f"batch-1 generate, {a.new_tokens} tokens"
        print(f"| {kind} | {task} | {r['fp32_s']:.3f} | {r['pq_s']:.3f} | {r['speedup']:.2f}x | {r['runtime_layers']} "
              f"| {len(r['plain_layers'])} | {r['rel_err']:.1e} |")
        if a.table_too:
            print(f"| {kind} | the same, every pq Linear by look-up table | | {r['pq_table_s']:.3f} | "
                  f"{r['table_speedup']:.2f}x | | | |")
    print("\nrounds (s):", json.dumps({k: v["rounds"] for k, v in res.items()}))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    harness.save("hf", {"rss": rss_rows, "speed": res, "sentences": a.sentences, "new_tokens": a.new_tokens,
                        "rounds": a.rounds}, a.record, threads=1)


if __name__ == "__main__":
    main()
