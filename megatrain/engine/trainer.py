"""The pretraining loop: config -> data + model -> DeepSpeed engine -> steps -> logs and checkpoints.

`pretrain(cfg, resume)` is what `launch/pretrain.py` (under torchrun / deepspeed) and
`megatrain pretrain` run in every process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatrain.config import Config, save_config
from megatrain.distributed import all_reduce_sum, barrier
from megatrain.engine import checkpoint as ckpt
from megatrain.engine.deepspeed import DistEnv, check_deepspeed_for, init_distributed, initialize
from megatrain.engine.health import LossSpikeDetector, Watchdog, default_store
from megatrain.engine.metrics import MetricsLogger, device_peak_flops, kernel_paths_line, mfu
from megatrain.engine.resilience import (RunLock, StopRequest, auto_resume_enabled, check_run_lock, fault_point,
                                         fault_spec)
from megatrain.env import local_world_size as env_local_world
from megatrain.env import rank as env_rank
from megatrain.env import world_size as env_world
from megatrain.errors import CheckpointError, ConfigError, MegatrainError
from megatrain.optim import build_optimizer
from megatrain.optim.relora import relora_controller
from megatrain.optim.schedules import lr_for_config
from megatrain.models.config import FROZEN_BASE_KINDS
from megatrain.parallel.plan import universal_checkpoint_info


# Inside run.dir: where a checkpoint from another layout is converted for loading (removed after).
RESHARD_SCRATCH = os.path.join("checkpoints", ".reshard")


class NonFiniteLossError(MegatrainError):
    """Too many non-finite losses in a row (train.max_nonfinite)."""


def resolve_config(cfg: Config, world_size: int) -> Config:
    """`cfg.resolve` with what this process detects: CUDA, and the kernel backend MEGATRAIN_KERNELS selects.

    Returns cfg, resolved in place. Raises ConfigError (one line), also for an unknown MEGATRAIN_KERNELS.
    """
    from megatrain import kernels

    try:
        triton_needs_cuda = kernels.triton_needs_cuda()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg.resolve(world_size, cuda=torch.cuda.is_available(), triton_needs_cuda=triton_needs_cuda)


def preflight(cfg: Config, resume, world_size: int, verify: Optional[bool] = None) -> Optional[str]:
    """Every check that needs no process group: the config resolved for `world_size` processes on this
    machine (batch arithmetic, ...), the data sources, the run dir and its lock, the checkpoint to resume.

    `verify` (default: in the launcher and on rank 0, i.e. where $RANK is unset or 0): also check that no
    live job holds run.dir, and the checksums of the checkpoint's files; other ranks check sizes only.
    Returns the checkpoint directory to resume from (or None). Raises MegatrainError (one line).
    """
    from megatrain.data import check_sources

    if verify is None:
        verify = env_rank() == 0
    resolve_config(cfg, world_size)
    fault_spec()  # a malformed test hook is one line here, not a traceback inside a rank
    if env_rank() == 0:  # one warning per launch, not one per rank
        from megatrain.engine.memory_plan import check_fits

        warning = check_fits(cfg, world_size, local_world=env_local_world() if env_world() > 1 else world_size)
        if warning is not None:
            print(warning, file=sys.stderr, flush=True)
    check_sources(cfg)
    check_deepspeed_for(cfg)
    if os.path.exists(cfg.run.dir) and not os.path.isdir(cfg.run.dir):
        raise ConfigError(f"run.dir '{cfg.run.dir}' exists and is not a directory")
    if verify:
        check_run_lock(cfg.run.dir)
    if not resume and auto_resume_enabled(cfg.train.auto_resume):
        resume = True
    path = ckpt.find_resume_checkpoint(cfg.run.dir, resume)
    if path is not None:
        meta = ckpt.read_meta(path, checksums=verify)
        model_cfg = cfg.model.resolved()
        if model_cfg.vocab_size is None:
            model_cfg.vocab_size = meta["model"].get("vocab_size")
        if meta.get("weights_only"):  # `megatrain import`: weights, no optimizer or layout to match
            ckpt.check_model(meta, path, model_cfg)
        else:
            ckpt.needs_reshard(meta, path, model_cfg, cfg.parallel.zero_stage, world_size // cfg.parallel.tensor,
                               cfg.parallel.tensor)
        if meta["step"] >= cfg.train.steps:
            raise CheckpointError(f"checkpoint '{path}' is at step {meta['step']}, the run has "
                                       f"train.steps={cfg.train.steps}: nothing left to train")
    elif cfg.train.init_from is not None:
        _check_init_from(cfg)
    return path


def _check_init_from(cfg: Config) -> None:
    """train.init_from: its model is this run's model and its tokenizer (when it carries one) is data.tokenizer."""
    import hashlib

    from megatrain.engine.load import source_model

    source = cfg.train.init_from
    saved, tokenizer = source_model(source)
    model_cfg = cfg.model.resolved()
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = saved.vocab_size
    ckpt.check_model({"model": dataclasses.asdict(saved)}, source, model_cfg)
    if not os.path.isfile(cfg.data.tokenizer):
        raise ConfigError(f"data.tokenizer: file '{cfg.data.tokenizer}' does not exist")
    if tokenizer is not None:
        digests = []
        for file in (tokenizer, cfg.data.tokenizer):
            with open(file, "rb") as fh:
                digests.append(hashlib.sha256(fh.read()).hexdigest())
        if digests[0] != digests[1]:
            raise CheckpointError(f"train.init_from '{source}' was trained with another tokenizer than "
                                  f"data.tokenizer='{cfg.data.tokenizer}' ({tokenizer})")


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, resume_path: Optional[str], instruments=None,
                 watchdog: Optional[Watchdog] = None, resume_hint: str = "continue with --resume"):
        from megatrain.data import open_data, prepare_data
        from megatrain.data.sampler import ResumableSampler
        from megatrain.parallel.checks import check_vocab_split
        from megatrain.parallel.groups import build_groups

        self.cfg, self.env = cfg, env
        # log.analyze_every: a callable trainer -> metrics (megatrain.analysis.live, above this layer)
        self.instruments = instruments
        self.watchdog = watchdog
        self.resume_hint = resume_hint  # how the command that runs this loop continues it after a stop
        self.stop = StopRequest()
        self.stop_agreed = False
        self.spikes = LossSpikeDetector(cfg.train.spike_window, cfg.train.spike_zscore)
        self.last_step_end = time.monotonic()
        self.groups = build_groups(cfg.parallel.tensor)
        self.dp_size, self.dp_rank = self.groups.dp_size, self.groups.dp_rank
        if env.is_main:
            os.makedirs(cfg.run.dir, exist_ok=True)
        # One process per node builds the tokenizer and token caches; the rest wait, then memory-map.
        if env.local_rank == 0:
            prepare_data(cfg)
        barrier()
        self.data = open_data(cfg)

        model_cfg = cfg.model.resolved()
        if model_cfg.vocab_size is None:
            model_cfg.vocab_size = self.data.vocab_size
        elif model_cfg.vocab_size < self.data.vocab_size:
            raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                              f"{self.data.vocab_size}")
        check_vocab_split(model_cfg.vocab_size, cfg.parallel.tensor,
                          f"model.vocab_size={model_cfg.vocab_size}" if cfg.model.vocab_size is not None
                          else f"the tokenizer's vocabulary {model_cfg.vocab_size}")
        self.model_cfg = model_cfg
        if env.is_main:
            save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))

        # Each rank materialises only its share (TP slices; ZeRO-3 partitions), every module from a
        # generator keyed by (train.seed, its name): a TP or ZeRO-3 run starts from the single-process weights.
        from megatrain.engine.build import build_model, model_counts

        weights_only = resume_path is not None and bool(ckpt.read_meta(resume_path).get("weights_only"))
        init_path = resume_path if weights_only else (cfg.train.init_from if resume_path is None else None)
        universal = False
        if resume_path is not None and not weights_only:
            universal = ckpt.needs_reshard(ckpt.read_meta(resume_path), resume_path, model_cfg,
                                           cfg.parallel.zero_stage, self.dp_size, cfg.parallel.tensor)
        # A reshard restores what the optimizer holds from DeepSpeed's universal checkpoint; frozen weights
        # (ReLoRA/LoRA's W) have no optimizer state there, so they come from the checkpoint's full
        # model.safetensors, each rank keeping its slice (the trainable ones are then overwritten).
        state_from = init_path if init_path is not None else (
            resume_path if universal and model_cfg.linear in FROZEN_BASE_KINDS else None)
        initial_state = None
        if state_from is not None:  # an imported run or train.init_from: full weights, each rank keeps its share
            from megatrain.engine.load import read_weights

            initial_state = read_weights(state_from)[1]
        self.num_params, self.flops_per_token = model_counts(model_cfg, cfg.data.seq_len)
        model = build_model(cfg, model_cfg, self.groups, initial_state=initial_state, source=state_from)
        del initial_state
        torch.manual_seed(cfg.train.seed)  # what trains randomly (LoRA dropout) starts alike at every layout
        load_path = self._universal_checkpoint(resume_path) if universal else resume_path
        self.relora = relora_controller(cfg, model)  # model.linear=relora: restarts (before the optimizer)
        self.optimizer = build_optimizer(cfg.optim, model, cfg.train.lr, on_cuda=env.device.type == "cuda")
        # The universal-checkpoint patterns name only what the optimizer holds (a frozen W has no ZeRO state).
        model.universal_checkpoint_info = universal_checkpoint_info(
            model, held={id(p) for group in self.optimizer.param_groups for p in group["params"]})
        self.engine = initialize(cfg, model, self.optimizer, mpu=self.groups if cfg.parallel.tensor > 1 else None,
                                 load_universal=universal)
        if cfg.train.compile:
            self.engine.compile()
        self.sampler = ResumableSampler(len(self.data.train), cfg.train.global_batch, cfg.train.micro_batch,
                                        self.dp_rank, self.dp_size, cfg.train.seed)
        self.step = 0
        self.nonfinite_streak = 0
        if resume_path is not None and not weights_only:
            state = ckpt.load_checkpoint(self.engine, load_path, env.rank)
            if universal:
                barrier()
                if env.is_main:
                    shutil.rmtree(os.path.join(cfg.run.dir, RESHARD_SCRATCH), ignore_errors=True)
            self.step = int(state["step"])
            self.sampler.load_state_dict(state["sampler"])
            self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
            self.spikes.load_state_dict(state.get("loss_window", []))
            _load_projected_state(self.optimizer, state, load_path, resharded=universal)
        self.peak = device_peak_flops(env.device)
        self.logger = MetricsLogger(cfg.run.dir, enabled=env.is_main, tensorboard=cfg.log.tensorboard,
                                    progress=cfg.log.progress, total_steps=cfg.train.steps, start_step=self.step)
        if init_path is not None:
            self.logger.message(f"started from the weights of {init_path} (fresh optimizer, step 0)")
        elif resume_path is not None:
            how = (f" (resharded to parallel.tensor={cfg.parallel.tensor} x {self.dp_size} data-parallel ranks through "
                   f"DeepSpeed's universal checkpoint)" if universal else "")
            self.logger.message(f"resumed from {resume_path} at step {self.step}{how}")

    # ------------------------------------------------------------------------------------------

    def _phase(self, name: str) -> None:
        """Name what this rank does now, for the watchdog (parallel.timeout_s)."""
        if self.watchdog is not None:
            self.watchdog.phase(name, self.step + 1)

    def _batch(self, blocks, indices):
        inputs, labels = blocks.batch(indices)
        return inputs.to(self.env.device, non_blocking=True), labels.to(self.env.device, non_blocking=True)

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the metrics of the step."""
        cfg, engine = self.cfg, self.engine
        lr = lr_for_config(cfg.train, self.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        if self.relora is not None:
            self.relora.before_step(engine, self.step)
        micro = self.sampler.next_step()
        # [sum of losses, non-finite count, ranks asked to stop (SIGTERM / SIGUSR1)]
        local = torch.zeros(3, dtype=torch.float64, device=self.env.device)
        for i, indices in enumerate(micro):
            self._phase("forward")
            inputs, labels = self._batch(self.data.train, indices)
            loss = engine(inputs, labels=labels)
            if i == 0:
                fault_point("step", self.step + 1, self.env.rank)
            detached = loss.detach().double()
            finite = torch.isfinite(detached)
            # Tensor ops only: no host sync per micro-batch; one host read after the all-reduce below.
            local[0] += torch.where(finite, detached, torch.zeros_like(detached))
            local[1] += (~finite).double()
            self._phase("backward")
            engine.backward(loss)
            if i == len(micro) - 1:
                # Every DP rank must agree before the (collective) step whether to apply it, and all
                # ranks whether to stop after it.
                self._phase("all-reduce of the loss")
                local[2] = 1.0 if self.stop.signum else 0.0
                all_reduce_sum(local)
                loss_sum, nonfinite, stop = local.tolist()
                # Summed over the world: the TP ranks of a group hold the same loss, so divide by all ranks.
                loss_value = loss_sum / (len(micro) * self.env.world_size)
                self.stop_agreed = stop > 0
                spike_z = None if nonfinite else self.spikes.score(loss_value)
                self.optimizer.skip_next_step = nonfinite > 0 or (spike_z is not None and cfg.train.spike_skip)
                if not self.optimizer.skip_next_step and cfg.parallel.zero_stage == 0:
                    grad_norm = _grad_norm(engine.module, self.groups)
            self._phase("optimizer step")
            engine.step()
        applied = not self.optimizer.skip_next_step
        self.optimizer.skip_next_step = False
        self.step += 1
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": None, "skipped": nonfinite > 0}
        if nonfinite:
            self.nonfinite_streak += 1
            record["loss"] = float("nan")
        else:
            self.nonfinite_streak = 0
            if spike_z is None:
                self.spikes.accept(loss_value)
            else:
                record["spike_z"] = spike_z
            if applied:
                if cfg.parallel.zero_stage != 0:
                    grad_norm = engine.get_global_grad_norm()
                record["grad_norm"] = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm
        now = time.monotonic()
        self.step_seconds, self.last_step_end = now - self.last_step_end, now
        return record

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        from megatrain.data.sampler import val_batches

        if self.data.val is None:
            return None
        engine = self.engine
        self._phase("evaluate")
        engine.eval()
        # Validation blocks that can score their answers (the synthetic tasks) report accuracy too.
        answer_counts = getattr(self.data.val, "answer_counts", None)
        total = torch.zeros(2 if answer_counts is None else 6, dtype=torch.float64, device=self.env.device)
        for indices in val_batches(self.data.val, self.cfg.train.micro_batch, self.dp_rank, self.dp_size,
                                   self.cfg.log.eval_batches):
            inputs, labels = self._batch(self.data.val, indices)
            total[0] += engine(inputs, labels=labels).float()
            total[1] += 1
            if answer_counts is not None:
                total[2:] += answer_counts(engine(inputs), labels)
        engine.train()
        all_reduce_sum(total)
        val_loss = (total[0] / total[1]).item()
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if answer_counts is not None:
            out.update(val_exact_match=(total[2] / total[3]).item(), val_answer_acc=(total[4] / total[5]).item())
        return out

    def _universal_checkpoint(self, checkpoint: str) -> str:
        """The DeepSpeed universal folder to resume `checkpoint` from at this run's layout.

        Uses `checkpoint/universal` when `megatrain reshard` made it; otherwise rank 0 converts into
        this run's scratch folder (never writing into the checkpoint). Collective.
        """
        from megatrain.engine import reshard

        scratch = os.path.join(self.cfg.run.dir, RESHARD_SCRATCH)
        error, folder = None, None
        if self.env.is_main:
            try:
                folder = reshard.find_universal(checkpoint) or reshard.convert_to_universal(
                    checkpoint, os.path.join(scratch, "universal"))
                folder = reshard.universal_for_layout(folder, self.cfg.parallel.tensor, self.model_cfg.kv_heads,
                                                      os.path.join(scratch, "view"))
            except MegatrainError as exc:
                error = str(exc)
        shared = [error, folder]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise CheckpointError(shared[0])
        return shared[1]

    def save(self) -> str:
        cfg = self.cfg
        meta = {"model": dataclasses.asdict(self.model_cfg),
                "layout": {"world_size": self.env.world_size, "dp": self.dp_size, "tensor": cfg.parallel.tensor,
                           "zero_stage": cfg.parallel.zero_stage},
                "consumed_samples": self.sampler.state_dict()["consumed_samples"],
                "seq_len": cfg.data.seq_len, "seed": cfg.train.seed, "tokenizer": self.data.tokenizer.path}
        client = {"step": self.step, "sampler": self.sampler.state_dict(), "nonfinite_streak": self.nonfinite_streak,
                  "loss_window": self.spikes.state_dict()}
        if self.watchdog is not None:
            self.watchdog.phase("checkpoint save", self.step)
        if getattr(self.optimizer, "projected", None) is not None:  # GaLore / Fira weights live outside ZeRO
            client["projected_optimizer"] = self.optimizer.projected.state_dict()
        path = ckpt.save_checkpoint(self.engine, run_dir=cfg.run.dir, step=self.step, client_state=client, meta=meta,
                                    keep=cfg.checkpoint.keep, rank=self.env.rank,
                                    tokenizer_path=self.data.tokenizer.path, groups=self.groups,
                                    model_cfg=self.model_cfg)
        self.logger.message(f"saved checkpoint {path}")
        return path

    def fit(self) -> dict:
        cfg = self.cfg
        t = cfg.train
        end = t.stop_after if t.stop_after is not None else t.steps
        tokens_per_step = t.global_batch * cfg.data.seq_len
        last: dict = {}
        window_start, window_tokens = time.perf_counter(), 0
        try:
            self.stop.install()
        except ValueError:
            pass  # not the main thread (an embedding application): it handles signals itself
        from megatrain import kernels

        kernels.reset_kernel_paths()
        first = True
        try:
            while self.step < end:
                record = self.train_step()
                if first:  # which path (Triton or the reference) each kernel op took, once
                    self.logger.message(kernel_paths_line(kernels.kernel_paths(), kernels.backend(), self.env.device))
                    first = False
                window_tokens += tokens_per_step
                skipped = record["skipped"]
                abort = skipped and self.nonfinite_streak >= t.max_nonfinite
                if skipped:
                    self.logger.message(f"step {self.step}: non-finite loss, update skipped "
                                        f"({self.nonfinite_streak} in a row, limit {t.max_nonfinite})")
                spike = "spike_z" in record
                if spike:
                    self.logger.message(f"step {self.step}: loss spike {record['loss']:.4g} (z={record['spike_z']:.1f} "
                                        f"over the last {len(self.spikes.history)} losses)"
                                        + (", update skipped" if t.spike_skip else ""))
                final = self.step == end
                do_eval = not abort and (cfg.log.eval_every > 0 and self.step % cfg.log.eval_every == 0
                                         or self.step == t.steps)
                do_analyze = (self.instruments is not None and cfg.log.analyze_every > 0
                              and self.step % cfg.log.analyze_every == 0)
                beat = cfg.log.heartbeat_every > 0 and self.step % cfg.log.heartbeat_every == 0
                if (self.step % cfg.log.every == 0 or final or do_eval or skipped or do_analyze or spike
                        or beat):
                    if self.env.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_start
                    tps = window_tokens / elapsed if elapsed > 0 else 0.0
                    record.update(tokens_per_s=tps, mfu=mfu(tps, self.flops_per_token, self.env.world_size, self.peak),
                                  tokens=self.step * tokens_per_step)
                    if do_eval:
                        record.update(self.evaluate() or {})
                    if do_analyze:
                        record.update(self.instruments(self))
                    if beat:
                        record["heartbeat"] = self._heartbeat()
                    record.pop("skipped")
                    self.logger.log(record)
                    last = record
                    window_start, window_tokens = time.perf_counter(), 0
                self.logger.advance()
                if abort:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_streak} non-finite losses in a row at step {self.step} "
                        f"(train.max_nonfinite={t.max_nonfinite}); lower train.lr or check the data")
                if final or self.stop_agreed or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    path = self.save()
                    window_start, window_tokens = time.perf_counter(), 0
                    if self.stop_agreed and not final:
                        why = f"{self.stop.name} received" if self.stop.signum else "a stop signal on another rank"
                        self.logger.message(f"stopped at step {self.step} ({why}); checkpoint {path}; "
                                            f"{self.resume_hint}")
                        break
        finally:
            self.stop.restore()
            self.logger.close()
        return last

    def _heartbeat(self) -> list:
        """[{rank, since_last_step_s}] for every rank: seconds since it finished its previous step (collective)."""
        self._phase("heartbeat")
        mine = torch.tensor([self.step_seconds], dtype=torch.float64, device=self.env.device)
        parts = [mine]
        if dist.is_initialized() and self.env.world_size > 1:
            parts = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
            dist.all_gather(parts, mine)
        return [{"rank": rank, "since_last_step_s": round(seconds.item(), 4)} for rank, seconds in enumerate(parts)]


def _grad_norm(module: torch.nn.Module, groups) -> float:
    """L2 norm of the (already DP-averaged) gradients, for ZeRO stage 0 where DeepSpeed reports none.

    DeepSpeed's rule: a tensor-parallel slice counts on its own rank, anything else (replicated
    weights, the extra copies of replicated KV heads) on TP rank 0 only; then one sum over the TP
    group. Accumulated on the device: one host sync per step.
    """
    grads = [p.grad.detach() for p in module.parameters()
             if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or groups.tp_rank == 0)]
    device = next(module.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        total += g.double().pow(2).sum()
    if groups.tp_size > 1:
        dist.all_reduce(total, group=groups.tp_group)
    return math.sqrt(total.item())


def _load_projected_state(optimizer, state: dict, path: str, resharded: bool) -> None:
    """GaLore / Fira state of the weights kept outside ZeRO (projections, moments, step counters)."""
    projected = getattr(optimizer, "projected", None)
    if projected is None:
        return
    if resharded:
        # Projections of other TP shards do not apply: the new layout starts them afresh.
        return
    if "projected_optimizer" not in state:
        raise CheckpointError(f"checkpoint '{path}' holds no GaLore/Fira optimizer state (was it written with "
                              f"another optim.name?)")
    projected.load_state_dict(state["projected_optimizer"])


def pretrain(cfg: Config, resume=None, instruments=None, resume_hint: str = "continue with --resume") -> dict:
    """Run (or resume) a pretraining job in this process; returns the last logged metrics.

    instruments: what log.analyze_every runs (`megatrain.analysis.live.training_instruments(cfg)`; the
    CLI passes it), required when log.analyze_every > 0. Rank 0 holds run.dir's lock for the length of
    the job; `train.auto_resume` (on under an elastic launch) turns a start without --resume into a
    resume from the latest checkpoint, if any. resume_hint: how the calling command continues after a
    stop signal (the end of the "stopped at step N" line).
    """
    if cfg.log.analyze_every > 0 and instruments is None:
        raise ConfigError("log.analyze_every needs the analysis instruments: run `megatrain pretrain`, or pass "
                          "instruments=megatrain.analysis.live.training_instruments(cfg) to pretrain()")
    world = env_world()
    is_rank0 = env_rank() == 0
    resume_path = preflight(cfg, resume, world)
    lock = RunLock(cfg.run.dir).acquire() if is_rank0 else None
    watchdog = None
    try:
        env = init_distributed(cfg)
        if env.world_size > 1:
            watchdog = Watchdog(cfg.parallel.timeout_s, env.rank, env.world_size, store=default_store(),
                                on_timeout=lock.release if lock is not None else None).start()
        trainer = Trainer(cfg, env, resume_path, instruments=instruments, watchdog=watchdog, resume_hint=resume_hint)
        return trainer.fit()
    finally:
        if watchdog is not None:
            watchdog.stop()
        if lock is not None:
            lock.release()
