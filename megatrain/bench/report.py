"""A benchmark's result as a markdown table (printed and written), JSON, and an optional PNG."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Optional

SIDE_TITLES = {"megatrain": "megatrain", "hf_deepspeed": "HF+DeepSpeed", "plain": "plain PyTorch"}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def source_commit() -> Optional[str]:
    """The git commit megatrain runs from ('+dirty' with uncommitted changes to tracked files), or None when
    its source is not a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip()[:12] + ("+dirty" if status.stdout.strip() else "")


def _num(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ms(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{1e3 * value:.1f}"


def _memory(side: Optional[dict]) -> str:
    """'peak (step)' per rank, GiB."""
    if side is None:
        return "n/a"
    steps = side.get("step_memory_gib_per_rank") or [None] * len(side["peak_memory_gib_per_rank"])
    return ", ".join(
        f"{m:.2f}" + ("" if t is None else f" ({t:.2f})") for m, t in zip(side["peak_memory_gib_per_rank"], steps)
    )


def best_step_ratio(ours: dict, other: dict) -> Optional[float]:
    """Other's fastest timed step over ours: the ratio least touched by other jobs on a shared machine
    (interference only ever adds time), beside the headline ratio of medians."""
    if not ours.get("step_times_s") or not other.get("step_times_s"):
        return None
    return min(other["step_times_s"]) / min(ours["step_times_s"])


def _dispatch_table(result: dict) -> list[str]:
    """Host work per step (the profiled steps): ATen ops dispatched, device kernels, host CPU time and the
    device's busy and idle time, per side; n/a where a side has no record or the device is a CPU."""
    rows = [
        (s["label"], name, side["dispatch"])
        for s in result["settings"]
        for name, side in s.get("sides", {}).items()
        if side.get("dispatch")
    ]
    if not rows:
        return []
    lines = [
        "",
        "Host work per step, from the profiled steps (ATen ops: every operator the dispatcher ran, nested "
        "ones included; kernels: device kernels of every kind; idle: profiled wall step minus the kernels' "
        "device time; host reads: values read out of tensors on the device in a warm-up step, each a host "
        "sync on a GPU, while on a CPU the count includes host-side tensors too, see the JSON's "
        "`host_reads_by_site`):",
        "",
        "| setting | side | ATen ops | device kernels | host reads | host CPU (ms) | device busy (ms) | "
        "device idle (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, name, d in rows:
        lines.append(
            f"| {label} | {SIDE_TITLES[name]} | {d['aten_ops']:.0f} | {_num(d['device_kernels'], '.0f')} | "
            f"{_num(d.get('host_reads'), '.0f')} | {_ms(d['host_cpu_s'])} | {_ms(d['device_busy_s'])} | "
            f"{_ms(d['device_idle_s'])} |"
        )
    sited = [(label, name, d["host_reads_by_site"]) for label, name, d in rows if d.get("host_reads_by_site")]
    if sited:
        lines += ["", "Where the host reads, per step (the code that read; `file:line` x reads):", ""]
        for label, name, sites in sited:
            where = ", ".join(f"`{site}` x{n:g}" for site, n in sites.items())
            lines.append(f"- {label}, {SIDE_TITLES[name]}: {where}")
    return lines


def render_markdown(result: dict) -> str:
    """The report: one row per setting (tokens/s of each side, the ratios, MFU, memory), the breakdown
    per side, the TP communication plan where TP > 1, then skipped columns, device and versions."""
    model = result["model"]
    first_ok = next((s for s in result["settings"] if "error" not in s), None)
    lines = [
        f"# Training throughput: {result['config_name']}",
        "",
        f"{model['description']} ({model['params'] / 1e6:.2f}M parameters, {model['flops_per_token']:,} FLOPs "
        f"per token), on {result['device']}.",
    ]
    if first_ok is not None:
        lines[-1] += (
            f" Sequence length {first_ok['seq_len']}, global batch {first_ok['global_batch']} "
            f"({first_ok['tokens_per_step']:,} tokens per step), {first_ok['dtype']}; median of "
            f"{first_ok['measured_steps']} steps per side after {first_ok['warmup_steps']} warm-up steps, "
            f"in alternating blocks of {first_ok['block']}."
        )
        if first_ok.get("clock") == "cpu":
            lines[-1] += (
                f" Steps timed by CPU time of the process ({first_ok['threads']} thread(s)), not wall "
                f"time: tokens/s means tokens per CPU-second of a rank."
            )
    planned = result.get("settings_planned", len(result["settings"]))
    if planned > len(result["settings"]):
        lines += ["", f"**Partial: {len(result['settings'])} of {planned} settings measured so far.**"]
    lines += [
        "",
        "| setting | procs | ZeRO | megatrain tok/s | HF+DeepSpeed tok/s | **megatrain / HF+DS** | "
        "best steps: megatrain / HF+DS | plain tok/s | megatrain / plain | MFU | "
        "memory per rank, peak (step), megatrain / HF+DS (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["settings"]:
        if "error" in s:
            lines.append(f"| {s['label']} | {s.get('procs', '')} | | failed: {s['error']} | | | | | | | |")
            continue
        sides, ratios = s["sides"], s["ratios"]
        ours, hf, plain = sides["megatrain"], sides.get("hf_deepspeed"), sides.get("plain")
        mfu = ours["mfu"]
        memory = _memory(ours) + (f" / {_memory(hf)}" if hf else "")
        lines.append(
            f"| {s['label']} | {s['world_size']} | {s['zero_stage']} | {ours['tokens_per_s']:,.0f} | "
            f"{_num(hf and hf['tokens_per_s'], ',.0f')} | "
            f"**{_num(ratios.get('megatrain_over_hf_deepspeed'), '.3f')}** | "
            f"{_num(hf and best_step_ratio(ours, hf), '.3f')} | "
            f"{_num(plain and plain['tokens_per_s'], ',.0f')} | {_num(ratios.get('megatrain_over_plain'), '.3f')} | "
            f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {memory} |"
        )
    lines += [
        "",
        "Time per step by phase, from separate profiled steps (ms; communication is the collectives' time "
        "inside backward and optimizer; other = profiled step - forward - backward - optimizer: data, schedule, "
        "loss reduction, Python"
        + (
            "; the breakdown is wall time even with --clock cpu, so on a loaded "
            "machine the profiled step exceeds the CPU-time step"
            if first_ok is not None and first_ok.get("clock") == "cpu"
            else ""
        )
        + "):",
        "",
        "| setting | side | timed step (median) | profiled step | forward | backward | optimizer | "
        "of which communication | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["settings"]:
        for name, side in s.get("sides", {}).items():
            b = side["breakdown_s"]
            if b is None:
                continue
            other = b["step"] - b["forward"] - b["backward"] - b["optimizer"]
            lines.append(
                f"| {s['label']} | {SIDE_TITLES[name]} | {_ms(side['median_step_s'])} | {_ms(b['step'])} | "
                f"{_ms(b['forward'])} | "
                f"{_ms(b['backward'])} | {_ms(b['optimizer'])} | {_ms(b['communication'])} | {_ms(other)} |"
            )
    lines += _dispatch_table(result)
    plans = [(s["label"], s["tp_comm"]) for s in result["settings"] if s.get("tp_comm")]
    if plans:
        lines += [
            "",
            "Computed tensor-parallel communication per rank and step (forward + backward, ring collectives; "
            "`megatrain.parallel.parallelize.tp_comm_volume`):",
            "",
            "| setting | per layer (MiB) | embedding + head (MiB) | loss (MiB) | per step (MiB) |",
            "|---|---|---|---|---|",
        ]
        for label, v in plans:
            lines.append(
                f"| {label} | {v['per_layer'] / 2**20:.2f} | {v['embedding_and_head'] / 2**20:.2f} | "
                f"{v['loss'] / 2**20:.2f} | {v['per_step'] / 2**20:.2f} |"
            )
    notes = []
    for s in result["settings"]:
        for name, reason in s.get("skipped", {}).items():
            notes.append(f"- {s['label']}: no {SIDE_TITLES[name]} column: {reason}")
        if s.get("kernel_paths") is not None:
            taken = ", ".join(f"{op} {path}" for op, path in s["kernel_paths"].items()) or "none called"
            notes.append(f"- {s['label']}: megatrain's kernels (MEGATRAIN_KERNELS={s.get('kernels')}): {taken}")
        losses = {n: side["first_step_loss"] for n, side in s.get("sides", {}).items()}
        if len(losses) > 1:
            shown = ", ".join(f"{SIDE_TITLES[n]} {v:.5f}" for n, v in losses.items())
            notes.append(f"- {s['label']}: first-step loss (same weights, same batch) {shown}")
    if first_ok is not None:
        notes.append(f"- memory: {first_ok['memory']}")
    notes.append(
        "- megatrain / HF+DS is the ratio of median step times; best steps is the ratio of each side's "
        "fastest step, which other jobs on a shared machine disturb least"
    )
    notes.append(
        "- MFU = tokens/s x FLOPs per token / (peak FLOP/s x processes); FLOPs per token = 6N + 12·L·H·Q·T "
        "(megatrain.engine.metrics; n/a where the device has no peak in its table, e.g. CPU)"
    )
    lines += [
        "",
        "Notes:",
        "",
        *notes,
        "",
        f"Command: `{result['command']}`",
        "",
        "Versions: "
        + ", ".join(f"{k} {v if v is not None else 'not installed'}" for k, v in result["versions"].items()),
    ]
    return "\n".join(lines) + "\n"


def write_table(prefix: str, table: str, record: dict) -> None:
    """A benchmark script's result: PREFIX.md (the markdown table it printed) and PREFIX.json (`record`)."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".md", "w", encoding="utf-8") as fh:
        fh.write(table)
    with open(prefix + ".json", "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
    print(f"wrote {prefix}.md and {prefix}.json")


def write_results(result: dict, out_dir: str, stem: str, plot: bool = False) -> dict[str, str]:
    """Write STEM.json and STEM.md (and STEM.png with plot, STEM-profile-SETTING-SIDE.txt for profiles)
    under out_dir; returns the paths by kind."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    profiles = {}
    for i, s in enumerate(result["settings"]):
        for side, table in (s.pop("profiles", None) or {}).items():
            path = os.path.join(out_dir, f"{stem}-profile-{i}-{side}.txt")
            with open(path, "w") as fh:
                fh.write(f"setting {s['label']}, side {side}\n{table}")
            profiles[f"{s['label']}/{side}"] = path
    if profiles:  # tables leave the record once written (a partial write came before the final one)
        result.setdefault("profile_files", {}).update({k: os.path.basename(v) for k, v in profiles.items()})
    paths.update({f"profile {k}": os.path.join(out_dir, v) for k, v in result.get("profile_files", {}).items()})
    with open(paths["json"], "w") as fh:
        json.dump(result, fh, indent=1)
    with open(paths["md"], "w") as fh:
        fh.write(render_markdown(result))
    if plot:
        paths["png"] = os.path.join(out_dir, stem + ".png")
        plot_results(result, paths["png"])
    return paths


def plot_results(result: dict, path: str) -> None:
    """Two bar charts per setting: tokens/s and peak memory per rank (max over ranks), one bar per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in result["settings"] if "error" not in s]
    names = [n for n in SIDE_TITLES if any(n in s["sides"] for s in settings)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(settings) + 4), 4.2))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(settings))]
        tps = [s["sides"][name]["tokens_per_s"] if name in s["sides"] else 0.0 for s in settings]
        mem = [max(s["sides"][name]["peak_memory_gib_per_rank"]) if name in s["sides"] else 0.0 for s in settings]
        axes[0].bar(xs, tps, width, label=SIDE_TITLES[name])
        axes[1].bar(xs, mem, width, label=SIDE_TITLES[name])
    for ax, title in zip(axes, ("tokens/s", "peak memory per rank (GiB)")):
        ax.set_xticks(range(len(settings)), [s["label"] for s in settings], rotation=20, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{result['config_name']} on {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
