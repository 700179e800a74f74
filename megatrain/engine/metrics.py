"""MFU accounting (FLOPs per token come from Transformer.flops_per_token) and the three log sinks:
metrics.jsonl, tensorboard, the progress bar.

Only rank 0 writes. `MetricsLogger.log` takes one dict per logged step; keys that every record has:
step, loss, lr, grad_norm, tokens_per_s, mfu (null where the device has no known peak), and
val_loss / val_ppl on evaluation steps, and `heartbeat` (a list of {rank, since_last_step_s}) every
log.heartbeat_every steps.

metrics.jsonl survives a crash: each record is one `write` of a whole line to a file opened for
appending, so a reader never sees two records run together, and a line cut short by a crash (a
full disk) is skipped by `read_metrics` and dropped when the run resumes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

# Dense bf16 tensor-core peak FLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def device_peak_flops(device: Optional[torch.device] = None) -> Optional[float]:
    """Peak bf16 FLOP/s of the current CUDA device, or None (CPU, or a GPU not in the table).

    `MEGATRAIN_PEAK_FLOPS` overrides the table (for GPUs it does not know).
    """
    from megatrain import env

    override = env.peak_flops()
    if override is not None:
        return override
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    # "NVIDIA H100 80GB HBM3" is the SXM part; PCIe and NVL say so in their names.
    if "H100" in name:
        if "PCIe" in name:
            return PEAK_BF16_FLOPS["H100 PCIe"]
        if "NVL" in name:
            return PEAK_BF16_FLOPS["H100 NVL"]
        return PEAK_BF16_FLOPS["H100 SXM"]
    for key in ("GH200", "H200", "B200", "A100", "A10G", "L40S", "L4", "RTX 4090"):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, num_devices: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation over all `num_devices`, or None without a known peak."""
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_tok / (peak * num_devices)


def compile_stats() -> dict:
    """What torch.compile traced in this process so far: {"graphs": compiled graphs, "graph_breaks": breaks,
    "break_reasons": {reason: count}} (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    reasons = dict(counters["graph_break"])
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": sum(reasons.values()),
        "break_reasons": reasons,
    }


def compile_line(backend: str) -> str:
    """One line after the first compiled step, e.g. "compile (inductor): 1 graph, 0 graph breaks"; with
    breaks, the most frequent reason (first line, shortened)."""
    stats = compile_stats()
    line = (
        f"compile ({backend}): {stats['graphs']} graph{'s' * (stats['graphs'] != 1)}, "
        f"{stats['graph_breaks']} graph break{'s' * (stats['graph_breaks'] != 1)}"
    )
    if stats["break_reasons"]:
        reason = max(stats["break_reasons"], key=stats["break_reasons"].get)
        line += f" (most often: {str(reason).splitlines()[0][:160]})"
    return line


def kernel_paths_line(paths: dict[str, str], backend: str, device: torch.device) -> str:
    """One line naming the path each kernel op took, e.g. "kernels (MEGATRAIN_KERNELS=auto, NVIDIA H200
    sm_90): rms_norm triton, fused_linear_cross_entropy torch" (megatrain.kernels.kernel_paths())."""
    where = "cpu"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    taken = ", ".join(f"{op} {path}" for op, path in paths.items()) or "none called"
    return f"kernels (MEGATRAIN_KERNELS={backend}, {where}): {taken}"


def _clean(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value  # json has no NaN; inf survives as Infinity
    return value


class Throughput:
    """Tokens per second and MFU over a window of steps: `add_step` after each step, `measure` at a logging
    step, `reset` where the next window starts (after evaluations and checkpoints, which it leaves out)."""

    def __init__(
        self, tokens_per_step: int, flops_per_token: float, devices: int, peak: Optional[float], device: torch.device
    ):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.devices, self.peak, self.device = devices, peak, device
        self.reset()

    def add_step(self) -> None:
        self.tokens += self.tokens_per_step

    def reset(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def measure(self, step: int) -> dict:
        """{tokens_per_s, mfu, tokens (seen by `step`)} of the window so far (waits for the device first)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.start
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        return {
            "tokens_per_s": tps,
            "mfu": mfu(tps, self.flops_per_token, self.devices, self.peak),
            "tokens": step * self.tokens_per_step,
        }


class MetricsLogger:
    """Rank-0 sink for metrics.jsonl, tensorboard events and a tqdm progress bar."""

    def __init__(
        self,
        run_dir: str,
        *,
        enabled: bool,
        tensorboard: bool,
        progress: bool,
        total_steps: int,
        start_step: int,
        every: int = 1,
        tb_prefix: Optional[str] = None,
    ):
        self.enabled = enabled
        self.every = every  # log.every: the steps `should_log` names
        self.tb_prefix = tb_prefix  # with one, tensorboard gets every other float of a record as PREFIX/key
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        path = os.path.join(run_dir, "metrics.jsonl")
        _truncate_after(path, start_step)
        self.jsonl = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)

    def should_log(self, step: int, last_step: bool = False) -> bool:
        """Whether `step` is a logging step of its own (every `every` steps, and the last one)."""
        return last_step or (self.every > 0 and step % self.every == 0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self._write_line(record)
        step = record["step"]
        if self.tb is not None:
            names = {
                "loss": "train/loss",
                "lr": "train/lr",
                "grad_norm": "train/grad_norm",
                "tokens_per_s": "perf/tokens_per_s",
                "mfu": "perf/mfu",
                "val_loss": "val/loss",
                "val_ppl": "val/perplexity",
                "val_exact_match": "val/exact_match",
                "val_answer_acc": "val/answer_acc",
            }
            for key, tag in names.items():
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(tag, value, step)
            for key, value in record.items():  # log.analyze_every's metrics carry their own tags
                if key.startswith("analysis/") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
                elif self.tb_prefix and key not in names and isinstance(value, float):
                    self.tb.add_scalar(f"{self.tb_prefix}/{key}", value, step)
        if self.bar is not None:
            shown = {"loss": record.get("loss"), "tok/s": record.get("tokens_per_s")}
            if record.get("mfu") is not None:
                shown["mfu"] = record["mfu"]
            if record.get("val_ppl") is not None:
                shown["val_ppl"] = record["val_ppl"]
            self.bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=False
            )

    def _write_line(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode("utf-8")
        while data:  # one write for a whole line; loop only on a short write
            written = os.write(self.jsonl, data)
            data = data[written:]

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            os.close(self.jsonl)
            self.jsonl = None


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, skipping a line cut short by a crash."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # the last line, still being written or cut by a crash
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


def _truncate_after(path: str, step: int) -> None:
    """On resume, drop records past the resumed step (and any cut line) so the log describes one trajectory."""
    if not os.path.exists(path):
        return
    from megatrain.files import write_atomic

    write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= step))
