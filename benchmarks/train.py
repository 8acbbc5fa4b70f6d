"""Train-step time of fairseq's transformer_lm with Quant-Noise: plain vs stock fairseq
``--quant-noise-pq 0.1`` vs the plugin's ``qn_transformer_lm`` with drop / scalar int8 / pq at p=0.1.

    python benchmarks/train.py [--rounds 5] [--steps 2] [--threads 2] [--device cpu|cuda] [--json out.json]

Every model is built in-process by fairseq itself (``options.parse_args_and_arch`` +
``task.build_model``) from the same command-line flags a user would pass: 6 layers (``--layers``), 512/2048, 8
heads, vocabulary 10000, batch 8 x 256 tokens.  A step is forward + cross-entropy + backward + Adam
on random tokens.  After one warm-up step per model (it also builds the pq codebooks), each round
times ``--steps`` steps of every model in turn (interleaved, so drift in machine load hits all of
them alike); the table gives the median over rounds of the per-round ratio to plain, for wall
time and for this process' CPU time (less sensitive to other processes on a shared machine).
``--device cuda``: the same models and steps on the GPU (fp32 weights; steps timed between
``torch.cuda.synchronize()`` calls; the CPU-time columns then say how busy the host was).

The plugin noises every Linear and the embedding, including the attention q/k/v/out projections
(it switches fairseq's attention to its module path); stock fairseq's hooks never run on the
projections there (its fused attention reads the weights directly).  The pq codebook refresh
(k-means every ``refresh_every`` = 1000 training forwards) is timed separately and shown amortised.
Two diagnostic rows split the overhead: plain with fairseq's attention module path switched on (the
plugin's routing, no noise), and our drop with the attention projections excluded (noise on the
FFN, embedding and output layers only, fused attention kept).
"""
import argparse
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file (python benchmarks/train.py): the repository root for the harness
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.harness import add_record_arg, machine, save  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "quantnoise" / "qn_fairseq")
VOCAB, BATCH, TOKENS = 10000, 8, 256
SIZE = ["--decoder-embed-dim", "512", "--decoder-ffn-embed-dim", "2048",
        "--decoder-attention-heads", "8", "--tokens-per-sample", str(TOKENS), "--dropout", "0.1"]
VARIANTS = {
    "plain transformer_lm": ["--arch", "transformer_lm"],
    "stock --quant-noise-pq 0.1": ["--arch", "transformer_lm", "--quant-noise-pq", "0.1",
                                   "--quant-noise-pq-block-size", "8"],
    "qn drop p=0.1": ["--arch", "qn_transformer_lm", "--quant-noise-scheme", "drop", "--quant-noise-p", "0.1"],
    "qn scalar int8 p=0.1": ["--arch", "qn_transformer_lm", "--quant-noise-scheme", "scalar",
                             "--quant-noise-bits", "8", "--quant-noise-p", "0.1"],
    "qn pq p=0.1": ["--arch", "qn_transformer_lm", "--quant-noise-scheme", "pq", "--quant-noise-p", "0.1"],
    # diagnostics: where the time goes
    "diag: plain, attention module path": ["--arch", "transformer_lm"],
    "diag: qn drop p=0.1, attention excluded": ["--arch", "qn_transformer_lm", "--quant-noise-scheme", "drop",
                                               "--quant-noise-p", "0.1", "--quant-noise-exclude", "self_attn"],
}


def build(data_dir: str, flags, device: str, layers: int):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data_dir, "--task", "language_modeling", "--user-dir", USER_DIR,
                                                *(["--cpu"] if device == "cpu" else []), "--decoder-layers", str(layers),
                                                *SIZE, *flags])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def make_step(model, device: str):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, VOCAB, (BATCH, TOKENS + 1), generator=gen).to(device)
    model.train()

    def step():
        logits = model(tokens[:, :-1])[0]  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def pq_refresh_seconds(model, device: str) -> float:
    """Time one rebuild of every pq codebook (what happens every refresh_every forwards)."""
    from quantnoise.nn import QuantNoiseMixin

    layers = [m for m in model.modules() if isinstance(m, QuantNoiseMixin)]
    t0 = time.perf_counter()
    for m in layers:
        m.qn_codebook = None
        m._codebook()
    sync(device)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers (512-d, FFN 2048, 8 heads)")
    ap.add_argument("--json", help="also write the raw per-round times here")
    add_record_arg(ap, "train")
    a = ap.parse_args()
    if a.rounds < 1 or a.steps < 1:
        print("benchmarks/train.py: --rounds and --steps must be >= 1", file=sys.stderr)
        return 2

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/train.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as data:
        (pathlib.Path(data) / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(VOCAB - 4)))  # + 4 specials
        models = {name: build(data, flags, a.device, a.layers) for name, flags in VARIANTS.items()}
    from fairseq.modules import MultiheadAttention

    for m in models["diag: plain, attention module path"].modules():  # what the plugin switches on
        if isinstance(m, MultiheadAttention):
            m._set_skip_embed_dim_check()
    for name, model in models.items():
        n = len(model.decoder.embed_tokens.weight)
        assert n == VOCAB, f"{name}: vocabulary {n}"
    steps = {name: make_step(m, a.device) for name, m in models.items()}
    for name, step in steps.items():  # warm-up (allocator, pq codebooks)
        step()

    times = {name: [] for name in steps}  # wall seconds per step, per round
    cpu = {name: [] for name in steps}  # this process' CPU seconds per step (all threads), per round
    order, rng = list(steps), random.Random(0)
    for r in range(a.rounds):
        rng.shuffle(order)  # a shuffled order each round: drift in the load falls on every model alike
        for name in order:
            step = steps[name]
            sync(a.device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                step()
            sync(a.device)
            times[name].append((time.perf_counter() - t0) / a.steps)
            cpu[name].append((time.process_time() - c0) / a.steps)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()),
              file=sys.stderr)
    refresh = pq_refresh_seconds(models["qn pq p=0.1"], a.device)

    def ratio(series, name):
        return statistics.median(x / p for x, p in zip(series[name], series["plain transformer_lm"]))

    m = machine(a.threads)
    print(f"{m['cpu']} ({m['isa']}), {a.threads} threads, device {a.device}, load average "
          f"{' / '.join(map(str, m['load_avg']))}\n")
    print("| model | wall s/step (median) | wall ratio to plain | CPU s/step (median) | CPU ratio to plain |")
    print("|---|---|---|---|---|")
    for name in times:
        print(f"| {name} | {statistics.median(times[name]):.3f} | {ratio(times, name):.3f} | "
              f"{statistics.median(cpu[name]):.3f} | {ratio(cpu, name):.3f} |")
    print(f"\nratios: median over {a.rounds} rounds of the per-round ratio, {a.steps} step(s) per model per round")
    print(f"\npq codebook refresh (all layers, once per 1000 forwards): {refresh:.2f} s "
          f"= {refresh / 1000:.4f} s/step amortised")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"times": times, "cpu": cpu, "pq_refresh_s": refresh, "rounds": a.rounds,
                                                    "steps": a.steps, "threads": a.threads, "device": a.device},
                                                   indent=1))
    save("train", {"device": a.device, "layers": a.layers, "rounds": a.rounds, "steps": a.steps,
                   "pq_refresh_s": refresh,
                   "rows": [{"model": name, "wall_s": statistics.median(times[name]), "wall_ratio": ratio(times, name),
                             "cpu_s": statistics.median(cpu[name]), "cpu_ratio": ratio(cpu, name)} for name in times]},
         a.record, threads=a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
