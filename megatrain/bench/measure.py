"""Timing one setting in every process of its run: the sides, alternating blocks, memory, breakdown.

Sides (each trains the same model from the same initial weights on the same batches in the same
order, ResumableSampler with train.seed):
- `megatrain`: `Trainer.train_step` (DeepSpeed engine, sampler, schedule, loss reduction, skip check).
- `hf_deepspeed`: transformers' LlamaForCausalLM with the megatrain model's weights
  (megatrain.bench.baseline), under `deepspeed.initialize` with the same generated DeepSpeed config
  (ZeRO stage, clipping, bf16, batch) and the same optimizer, in a minimal forward/backward/step loop.
- `plain`: the megatrain model in eager PyTorch (forward, backward, clip, AdamW); one process only.

Measurement blocks alternate between the sides so drift in machine speed hits all of them. After
timing, a few more steps of each side run under torch.profiler with the engine's forward / backward
/ step wrapped in named ranges: the breakdown (per step) is read from the profiler's ranges on CPU
and from CUDA events on GPU; communication is the time of the collective ops (gloo / NCCL / c10d)
the profiler saw, which happens inside backward and optimizer, so it is an "of which" figure.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import resource
import statistics
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function

from megatrain.bench.baseline import baseline_unsupported, hf_llama_from, transformers_version
from megatrain.engine.deepspeed import build_ds_config, use_bf16
from megatrain.engine.metrics import device_peak_flops, mfu
from megatrain.engine.trainer import Trainer
from megatrain.optim import build_optimizer
from megatrain.optim.schedules import lr_for_config

PHASES = ("forward", "backward", "optimizer")
# Collective ops as torch.profiler names them: c10d's dispatcher ops, gloo's and NCCL's own records and
# kernels. Self time only, so an op nested in another is not counted twice.
COMM_OPS = re.compile(r"c10d::|gloo:|nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast", re.IGNORECASE)
NO_TRANSFORMERS = "transformers is not installed (pip install 'megatrain[bench]'): HF+DeepSpeed column skipped"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# memory


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator statistics, or the process's peak RSS (Linux clear_refs).

    Returns False when the CPU peak cannot be reset (then `peak_memory_gib` is the process's peak so far).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM, the resident-set high-water mark
        return True
    except OSError:
        return False


def _proc_status_gib(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def peak_memory_gib(device: torch.device) -> float:
    """GPU: max allocated since the last reset; CPU: peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = _proc_status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_memory_gib(device: torch.device) -> float:
    """GPU: allocated now; CPU: resident set now (0 where unknown). What every side holds between steps."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return _proc_status_gib("VmRSS") or 0.0


# ------------------------------------------------------------------------------------------------
# phase timing


class PhaseClock:
    """Named ranges around forward / backward / optimizer: profiler ranges, plus CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        with record_function(f"bench/{name}"):
            if not self.cuda:
                yield
                return
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.events.append((name, start, end))

    def seconds(self, prof, steps: int) -> dict[str, float]:
        """Seconds per step in each phase, and in collectives (after the profiled steps finished)."""
        averages = prof.key_averages()
        out = {}
        if self.cuda:
            for name in PHASES:
                out[name] = sum(s.elapsed_time(e) for n, s, e in self.events if n == name) / 1e3 / steps
        else:
            for name in PHASES:
                out[name] = sum(a.cpu_time_total for a in averages if a.key == f"bench/{name}") / 1e6 / steps
        attr = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        if self.cuda and not hasattr(averages[0] if len(averages) else None, attr):
            attr = "self_cuda_time_total"  # torch < 2.5
        out["communication"] = (
            sum(getattr(a, attr, 0.0) for a in averages if COMM_OPS.search(a.key) and not a.key.startswith("bench/"))
            / 1e6
            / steps
        )
        return out


_READS = (
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
)
# torch's own frames between a read and the code that made it (Tensor methods, torch_function handling).
_DISPATCH_FILES = tuple(os.path.join(os.path.dirname(torch.__file__), name) for name in ("_tensor.py", "overrides.py"))
_REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep


def _site(filename: str, line: int) -> str:
    """'package/module.py:line' of a frame: the path after site-packages/ or the repository root."""
    for root in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if root in filename:
            return f"{filename.split(root)[-1]}:{line}"
    return f"{filename[len(_REPO_DIR) :] if filename.startswith(_REPO_DIR) else filename}:{line}"


class HostReads(TorchFunctionMode):
    """Counts the values the host reads out of tensors on `device` (`item`, `tolist`, `bool`, `float`, `int`,
    `index`) while active. On a GPU each such read copies from the device and waits for every kernel queued
    before it: a host sync, which leaves the GPU idle until the host has launched the next kernels. On a CPU
    every tensor counts, so the figure includes reads of host-side tensors (the sampler's order, optimizer
    step counters) that are no sync on a GPU; `sites` (a Counter of 'package/module.py:line' of the code that
    read) tells them apart; with `trace`, `order` lists the sites read by read."""

    def __init__(self, device: torch.device, trace: bool = False):
        super().__init__()
        self.device_type = torch.device(device).type
        self.count = 0
        self.sites: collections.Counter = collections.Counter()
        self.order: Optional[list[str]] = [] if trace else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS and args and isinstance(args[0], torch.Tensor) and args[0].device.type == self.device_type:
            self.count += 1
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename in _DISPATCH_FILES:
                frame = frame.f_back
            site = "?" if frame is None else _site(frame.f_code.co_filename, frame.f_lineno)
            self.sites[site] += 1
            if self.order is not None:
                self.order.append(site)
        return func(*args, **(kwargs or {}))


def dispatch_counts(prof, steps: int, host_cpu_s: float, wall_s: float, cuda: bool) -> dict:
    """What the host did per step, from the profiled steps: `aten_ops` (every ATen operator the
    dispatcher ran, nested calls included, so a composite op counts with the ops it decomposes into;
    `aten_ops_by_name` splits it by operator, most frequent first),
    `device_kernels` (kernels the GPU ran, cuBLAS, Triton and NCCL alike; None on CPU), `host_cpu_s`
    (this process's CPU time), `device_busy_s` (the kernels' summed device time; None on CPU) and
    `device_idle_s` (the profiled wall step minus that: time the GPU waited for the host, or for
    communication). A host-bound step shows host CPU time close to the wall step and a large idle part."""
    averages = prof.key_averages()
    by_op = {a.key: a.count / steps for a in averages if a.key.startswith("aten::")}
    aten = sum(by_op.values()) * steps
    kernels = busy = None
    if cuda:
        device_events = [a for a in averages if str(getattr(a, "device_type", "")).endswith("CUDA")]
        kernels = sum(a.count for a in device_events)
        busy = (
            sum(getattr(a, "self_device_time_total", getattr(a, "self_cuda_time_total", 0.0)) for a in device_events)
            / 1e6
            / steps
        )
    return {
        "aten_ops": aten / steps,
        "aten_ops_by_name": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "device_kernels": None if kernels is None else kernels / steps,
        "host_cpu_s": host_cpu_s / steps,
        "device_busy_s": busy,
        "device_idle_s": None if busy is None else max(0.0, wall_s / steps - busy),
    }


def _timed(fn, clock: PhaseClock, phase: str):
    def wrapper(*args, **kwargs):
        with clock.phase(phase):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def instrumented_engine(engine, clock: PhaseClock):
    """Wrap a DeepSpeed engine's forward / backward / step in the clock's phases (instance attributes,
    removed afterwards, so timed steps run the engine untouched)."""
    names = {"forward": "forward", "backward": "backward", "step": "optimizer"}
    for attr, phase in names.items():
        object.__setattr__(engine, attr, _timed(getattr(engine, attr), clock, phase))
    try:
        yield
    finally:
        for attr in names:
            object.__delattr__(engine, attr)


@contextlib.contextmanager
def instrumented_pipeline_engine(engine, clock: PhaseClock):
    """The same phases for DeepSpeed's pipeline engine, whose 1F1B schedule calls its instructions through
    `_INSTRUCTION_MAP` (bound per call): a copy of the engine's map with the forward / backward / optimizer
    instructions wrapped, the engine's own map put back afterwards. The sends, receives and waits of the schedule (the
    bubble) stay outside the phases, in "other"."""
    from deepspeed.runtime.pipe import schedule

    phases = {
        schedule.ForwardPass: "forward",
        schedule.BackwardPass: "backward",
        schedule.OptimizerStep: "optimizer",
    }
    own = vars(engine).get("_INSTRUCTION_MAP")  # the trainer's map (optim.deepspeed_adapter.before_pipeline_step)
    table = dict(engine._INSTRUCTION_MAP)
    for instruction, phase in phases.items():
        table[instruction] = _timed(table[instruction], clock, phase)
    object.__setattr__(engine, "_INSTRUCTION_MAP", table)
    try:
        yield
    finally:
        if own is None:
            object.__delattr__(engine, "_INSTRUCTION_MAP")
        else:
            object.__setattr__(engine, "_INSTRUCTION_MAP", own)


# ------------------------------------------------------------------------------------------------
# the sides


class MegatrainSide:
    name = "megatrain"

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def step(self):
        return self.trainer.train_step()["loss"]

    def instrumented(self, clock: PhaseClock):
        if self.trainer.pipeline is not None:
            return instrumented_pipeline_engine(self.trainer.engine, clock)
        return instrumented_engine(self.trainer.engine, clock)

    def compiled(self) -> bool:
        return bool(getattr(self.trainer.engine, "is_compiled", False))

    def close(self) -> None:
        self.trainer.logger.close()


def _initial_model(cfg, model_cfg, device):
    """The trainer's initial weights: every module keyed by (train.seed, its name), as engine.build does."""
    from megatrain.models.transformer import Transformer

    torch.manual_seed(cfg.train.seed)  # what trains randomly (dropout) starts as in the trainer
    model = Transformer(model_cfg, seed=cfg.train.seed).to(device)
    model.gradient_checkpointing = cfg.train.activation_checkpointing
    return model


def _sampler(cfg, data, dp_rank: int, dp_size: int):
    from megatrain.data.sampler import ResumableSampler

    return ResumableSampler(
        len(data.train), cfg.train.global_batch, cfg.train.micro_batch, dp_rank, dp_size, cfg.train.seed
    )


class HFDeepSpeedSide:
    """transformers' LlamaForCausalLM (same weights) trained through DeepSpeed with the same config."""

    name = "hf_deepspeed"

    def __init__(self, cfg, trainer: Trainer):
        import deepspeed

        env = trainer.env
        self.cfg, self.data, self.device = cfg, trainer.data, env.device
        hf = hf_llama_from(_initial_model(cfg, trainer.model_cfg, env.device))
        if cfg.train.activation_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = build_optimizer(cfg.optim, hf, cfg.train.lr, on_cuda=env.device.type == "cuda")
        self.engine, _, _, _ = deepspeed.initialize(model=hf, optimizer=optimizer, config=build_ds_config(cfg))
        if cfg.train.compile:
            self.engine.compile(backend=cfg.train.compile_backend)
        self.sampler = _sampler(cfg, trainer.data, trainer.dp_rank, trainer.dp_size)
        self.step_index = 0

    def step(self):
        engine = self.engine
        lr = lr_for_config(self.cfg.train, self.step_index)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        micro = self.sampler.next_step()
        total = torch.zeros((), device=self.device)
        for indices in micro:
            x, y = self.data.train.batch(indices)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # megatrain's labels are already shifted (y[t] follows x[t]): shift_labels makes HF use them as is.
            loss = engine(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        self.step_index += 1
        return total / len(micro)

    def instrumented(self, clock: PhaseClock):
        return instrumented_engine(self.engine, clock)

    def compiled(self) -> bool:
        return bool(getattr(self.engine, "is_compiled", False))

    def close(self) -> None:
        pass


class PlainSide:
    """The megatrain model in eager PyTorch: forward -> loss -> backward -> clip -> AdamW.step."""

    name = "plain"

    def __init__(self, cfg, trainer: Trainer):
        device = trainer.env.device
        self.model = _initial_model(cfg, trainer.model_cfg, device)
        self.bf16 = use_bf16(cfg)  # fp32 weights, bf16 autocast: the usual eager mixed precision
        if cfg.train.compile:
            self.model.compile(backend=cfg.train.compile_backend)
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.train.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay,
            fused=device.type == "cuda" or None,
        )
        self.cfg, self.data, self.device = cfg, trainer.data, device
        self.sampler = _sampler(cfg, trainer.data, 0, 1)
        self.clock: Optional[PhaseClock] = None

    def _phase(self, name: str):
        return self.clock.phase(name) if self.clock is not None else contextlib.nullcontext()

    def step(self):
        micro = self.sampler.next_step()
        total = torch.zeros((), device=self.device)
        for indices in micro:
            x, y = self.data.train.batch(indices)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._phase("forward"), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(x, labels=y)
            with self._phase("backward"):
                (loss / len(micro)).backward()
            total += loss.detach().float()
        with self._phase("optimizer"):
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return total / len(micro)

    @contextlib.contextmanager
    def instrumented(self, clock: PhaseClock):
        self.clock = clock
        try:
            yield
        finally:
            self.clock = None

    def compiled(self) -> bool:
        return getattr(self.model, "_compiled_call_impl", None) is not None

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# one setting


def side_plan(cfg, trainer: Trainer, *, baseline: bool, plain: bool) -> tuple[list[str], dict[str, str]]:
    """Which sides run for this setting, and why the others do not."""
    sides, skipped = ["megatrain"], {}
    reason = None
    if not baseline:
        reason = "left out (--no-baseline)"
    elif transformers_version() is None:
        reason = NO_TRANSFORMERS
    elif cfg.parallel.tensor > 1:
        reason = "the baseline has no tensor parallelism (DeepSpeed data parallelism only)"
    elif cfg.parallel.pipeline > 1 or cfg.parallel.context > 1:
        reason = "the baseline has no pipeline or context parallelism (DeepSpeed data parallelism only)"
    elif cfg.optim.name != "adamw":
        reason = f"optim.name={cfg.optim.name} needs megatrain's layer names (the baseline runs adamw only)"
    else:
        reason = baseline_unsupported(trainer.model_cfg)
    if reason is None:
        sides.append("hf_deepspeed")
    else:
        skipped["hf_deepspeed"] = reason
    if not plain:
        skipped["plain"] = "left out (--no-plain)"
    elif trainer.env.world_size > 1:
        skipped["plain"] = "the plain PyTorch loop runs in one process only"
    else:
        sides.append("plain")
    return sides, skipped


def _world_mean(loss, world_size: int) -> float:
    """A step's loss averaged over the ranks (Trainer.train_step already returns that float)."""
    if not isinstance(loss, torch.Tensor):
        return float(loss)
    if world_size > 1:
        loss = loss.detach().double().clone()
        dist.all_reduce(loss)
        loss /= world_size
    return float(loss)


def _gather(value, world_size: int) -> list:
    if world_size == 1:
        return [value]
    out = [None] * world_size
    dist.all_gather_object(out, value)
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_setting(
    cfg,
    env,
    *,
    warmup: int,
    steps: int,
    block: int,
    breakdown_steps: int = 2,
    profile_steps: int = 0,
    baseline: bool = True,
    plain: bool = True,
    clock: str = "wall",
    threads: Optional[int] = None,
) -> dict:
    """Time `cfg` on this process group (collective: every rank calls it). Returns the setting's record
    (the same on every rank): per side the median step time, tokens/s, MFU, peak memory per rank,
    the breakdown, and the first step's loss; `profiles` holds the op tables when profile_steps > 0.

    clock "wall" times steps by wall time; "cpu" by this process's CPU time (time.process_time), which
    other jobs on a shared machine barely touch (tokens/s then reads tokens per CPU-second of a rank).
    threads, when given, sets torch's intra-op threads for the setting.
    """
    from megatrain import kernels

    if threads is not None:
        torch.set_num_threads(threads)
    timer = CLOCKS[clock]

    trainer = Trainer(cfg, env, resume_path=None)
    names, skipped = side_plan(cfg, trainer, baseline=baseline, plain=plain)
    sides = [MegatrainSide(trainer)]
    if "hf_deepspeed" in names:
        sides.append(HFDeepSpeedSide(cfg, trainer))
    if "plain" in names:
        sides.append(PlainSide(cfg, trainer))
    device = env.device
    first_loss = {}
    try:
        kernel_paths = {}
        reads: dict[str, HostReads] = {}  # counted over the warm-up steps after the first (not under compile)
        for side in sides:
            if side.name == "megatrain":
                kernels.reset_kernel_paths()
            if warmup > 1 and not cfg.train.compile:
                reads[side.name] = HostReads(device)
            for i in range(warmup):
                with reads[side.name] if i > 0 and side.name in reads else contextlib.nullcontext():
                    loss = side.step()
                if i == 0:
                    first_loss[side.name] = _world_mean(loss, env.world_size)
            if side.name == "megatrain":  # the path each kernel op took in megatrain's warm-up steps
                kernel_paths = kernels.kernel_paths()
        sync(device)
        times: dict[str, list[float]] = {s.name: [] for s in sides}
        peaks: dict[str, float] = {s.name: 0.0 for s in sides}
        transients: dict[str, float] = {s.name: 0.0 for s in sides}  # peak over what was resident before the block
        resettable = True
        done = 0
        while done < steps:
            n = min(block, steps - done)
            for side in sides:
                resident = current_memory_gib(device)
                resettable = reset_peak_memory(device) and resettable
                for _ in range(n):
                    t0 = timer()
                    side.step()
                    sync(device)
                    times[side.name].append(timer() - t0)
                peak = peak_memory_gib(device)
                peaks[side.name] = max(peaks[side.name], peak)
                transients[side.name] = max(transients[side.name], peak - resident)
            done += n
        breakdown, profiles, dispatch = {}, {}, {}
        profiled = max(breakdown_steps, profile_steps)
        if profiled > 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            for side in sides:
                phase_clock = PhaseClock(device)
                with side.instrumented(phase_clock), profile(activities=activities) as prof:
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(profiled):
                        side.step()
                    sync(device)
                    wall, host = time.perf_counter() - t0, time.process_time() - c0
                # The phases against the profiled steps' own wall time (profiling slows steps down a little).
                breakdown[side.name] = {"step": wall / profiled, **phase_clock.seconds(prof, profiled)}
                dispatch[side.name] = dispatch_counts(prof, profiled, host, wall, device.type == "cuda")
                counted = reads.get(side.name)
                dispatch[side.name]["host_reads"] = None if counted is None else counted.count / (warmup - 1)
                dispatch[side.name]["host_reads_by_site"] = (
                    None if counted is None else {site: n / (warmup - 1) for site, n in counted.sites.most_common(12)}
                )
                if profile_steps:
                    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                    profiles[side.name] = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
    finally:
        for side in sides:
            side.close()

    tokens = cfg.train.global_batch * cfg.data.seq_len
    peak_flops = device_peak_flops(device)
    records = {}
    for side in sides:
        # Ranks step in lockstep (collectives); rank 0's clock is the run's.
        median = statistics.median(times[side.name])
        tps = tokens / median
        records[side.name] = {
            "median_step_s": median,
            "tokens_per_s": tps,
            "mfu": mfu(tps, trainer.flops_per_token, env.world_size, peak_flops),
            "peak_memory_gib_per_rank": _gather(peaks[side.name], env.world_size),
            "step_memory_gib_per_rank": _gather(transients[side.name], env.world_size),
            "breakdown_s": breakdown.get(side.name),
            "dispatch": dispatch.get(side.name),
            "first_step_loss": first_loss.get(side.name),
            "step_times_s": times[side.name],
            "compiled": side.compiled(),
        }
    ratios = {}
    for other in ("hf_deepspeed", "plain"):
        if other in records:
            ratios[f"megatrain_over_{other}"] = records["megatrain"]["tokens_per_s"] / records[other]["tokens_per_s"]
            ratios[f"megatrain_over_{other}_best_step"] = min(times[other]) / min(times["megatrain"])
            if other in dispatch and dispatch[other]["aten_ops"]:
                ratios[f"aten_ops_megatrain_over_{other}"] = (
                    dispatch["megatrain"]["aten_ops"] / dispatch[other]["aten_ops"]
                )
    result = {
        "world_size": env.world_size,
        "tensor": cfg.parallel.tensor,
        "data_parallel": trainer.dp_size,
        "sequence_parallel": cfg.parallel.sequence,
        "zero_stage": cfg.parallel.zero_stage,
        "micro_batch": cfg.train.micro_batch,
        "grad_accum": cfg.train.grad_accum,
        "global_batch": cfg.train.global_batch,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": tokens,
        "dtype": "bf16" if use_bf16(cfg) else "fp32",
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "compile": cfg.train.compile,
        "kernels": kernels.backend(),
        "kernel_paths": kernel_paths,
        "params": trainer.num_params,
        "flops_per_token": trainer.flops_per_token,
        "peak_flops": peak_flops,
        "memory": (
            "peak: max allocated (torch.cuda) while the side ran; step: that peak minus what was allocated "
            "before its steps"
            if device.type == "cuda"
            else "peak: the process's peak resident set while the side ran; step: that peak minus the resident set "
            "before its steps" + ("" if resettable else " (peak not resettable here: process peak)")
        )
        + "; all sides live in one process, so the peak includes the other sides' weights and optimizer "
        "state, the step figure is this side's own activations and temporaries",
        "warmup_steps": warmup,
        "measured_steps": steps,
        "block": block,
        "breakdown_steps": profiled,
        "clock": clock,
        "threads": torch.get_num_threads(),
        "sides": records,
        "skipped": skipped,
        "ratios": ratios,
        "profiles": profiles,
        "vocab_size": trainer.model_cfg.vocab_size,
    }
    del sides, trainer
    return result


def kernels_env(choice: Optional[str]):
    """Context: MEGATRAIN_KERNELS=choice while inside (None: unchanged)."""

    @contextlib.contextmanager
    def scope():
        if choice is None:
            yield
            return
        old = os.environ.pop("MEGATRAIN_KERNELS", None)  # a write and its undo: megatrain.env reads it
        os.environ.update(MEGATRAIN_KERNELS=choice)
        try:
            yield
        finally:
            os.environ.pop("MEGATRAIN_KERNELS", None)
            if old is not None:
                os.environ.update(MEGATRAIN_KERNELS=old)

    return scope()
