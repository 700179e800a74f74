"""IHA vs MHA quality on the synthetic retrieval tasks (tiny preset): exact-match accuracy.

    python benchmarks/iha_quality.py                     # both tasks, 3 models each
    python benchmarks/iha_quality.py --steps 200 --tasks multikey

For each task (megatrain.data.tasks: multi-key retrieval, multi-hop composition) three tiny-preset
models train from the same seed on the same batches and are scored on held-out sequences:

- MHA: the tiny preset with its FFN one unit wider (ffn_dim 177 instead of 176), which brings its
  parameter count to within 0.2% of IHA's (IHA P=2 adds 3*H*H*P + H*P = 104 weights per layer;
  one FFN unit is 3*dim = 192 weights per layer), so the comparison is at equal parameters;
- IHA P=2: model.attention=iha, every layer full (causal over virtual tokens, RoPE at n*P + p);
- IHA P=2 flop-matched: model.iha.schedule=flop_matched: short layers use a sliding window of
  N/(2P) virtual tokens (rounded down to a multiple of P; the attention cost of an MHA layer) and
  every full_every-th layer attends fully. The table states each model's attention FLOPs per token,
  from `Transformer.flops_per_token`, so the ratio to MHA is explicit.

Training: AdamW (weight decay 0.1 on matrices, betas 0.9/0.95), linear warm-up then cosine decay
to 10% (megatrain.optim.schedules), loss on answer tokens only, one thread on CPU. Accuracy is
exact match (every answer of a sequence right; teacher-forced argmax, which equals greedy decoding
for these tasks, see megatrain/data/tasks.py) and per-answer accuracy, on data.task.val_size
held-out sequences. Writes a markdown table and JSON to benchmarks/results/iha-quality-{cpu,gpu}.*.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

# Run as a script, this folder comes first on sys.path, and its kernels.py would then answer the
# `import kernels` that transformers makes (Hugging Face's package). megatrain is imported installed.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from megatrain.bench.report import write_table  # noqa: E402
from megatrain.config import TaskConfig, TrainConfig  # noqa: E402
from megatrain.data.tasks import TaskBlocks, evaluate_exact_match, required_seq_len, task_vocab_size  # noqa: E402
from megatrain.models.config import IHAConfig, ModelConfig  # noqa: E402
from megatrain.models.transformer import Transformer  # noqa: E402
from megatrain.optim import param_groups  # noqa: E402
from megatrain.optim.schedules import lr_for_config  # noqa: E402

TASK_SIZES = {  # small enough that a tiny model learns something in minutes on 2 CPU cores
    "multikey": TaskConfig(pairs=8, queries=4, symbols=60, val_size=512, seed=0),
    "multihop": TaskConfig(pairs=6, hops=2, symbols=28, val_size=512, seed=0),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="multikey,multihop")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--pseudo-heads", type=int, default=2)
    p.add_argument("--full-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/iha-quality-{cpu,gpu})")
    return p.parse_args()


def flop_matched_window(seq_len: int, pseudo: int) -> int:
    """N/(2P) virtual tokens, rounded down to a positive multiple of P."""
    return max(pseudo, seq_len // (2 * pseudo) // pseudo * pseudo)


def model_configs(task_cfg: TaskConfig, seq_len: int, pseudo: int, full_every: int) -> dict[str, ModelConfig]:
    vocab = task_vocab_size(task_cfg)
    base = dict(preset="tiny", vocab_size=vocab, max_seq_len=seq_len)
    window = flop_matched_window(seq_len, pseudo)
    return {
        "MHA (ffn 177)": ModelConfig(**base, ffn_dim=177),
        f"IHA P={pseudo}": ModelConfig(**base, attention="iha", iha=IHAConfig(pseudo_heads=pseudo)),
        f"IHA P={pseudo} flop-matched (W={window}, full every {full_every})": ModelConfig(
            **base,
            attention="iha",
            iha=IHAConfig(pseudo_heads=pseudo, schedule="flop_matched", window=window, full_every=full_every),
        ),
    }


def attention_flops_per_token(model: Transformer, seq_len: int) -> int:
    """The attention-score part of flops_per_token (what the FLOP matching is about)."""
    cfg = model.config
    if cfg.attention != "iha":
        return 12 * cfg.layers * cfg.heads * cfg.head_dim * seq_len
    pseudo, total = cfg.iha.pseudo_heads, 0
    for block in model.blocks:
        keys = seq_len * pseudo if block.attn.window is None else min(2 * block.attn.window, seq_len * pseudo)
        total += 12 * cfg.heads * cfg.head_dim * pseudo * keys
    return total


def train_and_score(
    name: str, model_cfg: ModelConfig, task: str, task_cfg: TaskConfig, seq_len: int, args, device
) -> dict:
    torch.manual_seed(args.seed)
    model = Transformer(model_cfg).to(device)
    train_cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, min_lr_ratio=0.1, schedule="cosine")
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    train = TaskBlocks(task, task_cfg, seq_len, 0)
    val = TaskBlocks(task, task_cfg, seq_len, 1)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_for_config(train_cfg, step)
        first = (step * args.batch) % (len(train) - args.batch)
        inputs, labels = train.batch(range(first, first + args.batch))
        loss = model(inputs.to(device), labels=labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    scores = evaluate_exact_match(model, val, batch_size=128, device=device)
    tail = losses[-50:]
    row = {
        "task": task,
        "model": name,
        "params": model.num_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(seq_len),
        "attention_flops_per_token": attention_flops_per_token(model, seq_len),
        "final_train_loss": sum(tail) / len(tail),
        "exact_match": scores["exact_match"],
        "answer_acc": scores["answer_acc"],
        "val_sequences": scores["sequences"],
        "train_s": train_s,
    }
    print(
        f"{task:9s} {name:45s} exact {row['exact_match']:.3f} answers {row['answer_acc']:.3f} "
        f"loss {row['final_train_loss']:.3f} ({train_s:.0f} s)",
        flush=True,
    )
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        f"# IHA vs MHA on synthetic retrieval tasks ({meta['device']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; "
        f"{meta['steps']} steps x batch {meta['batch']}, lr {meta['lr']}, seed {meta['seed']}; "
        f"scored on {rows[0]['val_sequences'] if rows else 0} held-out sequences per task.",
        "",
    ]
    for task, sizes in meta["tasks"].items():
        out.append(f"- {task}: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    out += [
        "",
        "| task | model | non-emb. params | attention FLOPs/token (vs MHA) | total FLOPs/token | "
        "final train loss | exact match | answer acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mha = {r["task"]: r for r in rows if r["model"].startswith("MHA")}
    for r in rows:
        ratio = r["attention_flops_per_token"] / mha[r["task"]]["attention_flops_per_token"] if r["task"] in mha else 1
        out.append(
            f"| {r['task']} | {r['model']} | {r['params']:,} | {r['attention_flops_per_token']:,} "
            f"({ratio:.2f}x) | {r['flops_per_token']:,} | {r['final_train_loss']:.3f} | "
            f"{r['exact_match']:.3f} | {r['answer_acc']:.3f} |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASK_SIZES]
    if bad:
        print(f"iha_quality: error: unknown task {bad[0]!r} (allowed: {', '.join(TASK_SIZES)})", file=sys.stderr)
        return 2
    import triton

    rows = []
    for task in tasks:
        task_cfg = TASK_SIZES[task]
        seq_len = required_seq_len(task, task_cfg)
        for name, model_cfg in model_configs(task_cfg, seq_len, args.pseudo_heads, args.full_every).items():
            rows.append(train_and_score(name, model_cfg, task, task_cfg, seq_len, args, device))
    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    meta = {
        "device": device.type,
        "machine": machine,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "tasks": {t: {**vars(TASK_SIZES[t]), "seq_len": required_seq_len(t, TASK_SIZES[t])} for t in tasks},
    }
    table = markdown(rows, meta)
    print(table)
    prefix = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"iha-quality-{'gpu' if device.type == 'cuda' else 'cpu'}",
    )
    write_table(prefix, table, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
