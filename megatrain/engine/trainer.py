"""The pretraining loop: config -> data + model -> DeepSpeed engine -> steps -> logs and checkpoints.

`pretrain(cfg, resume)` is what `launch/pretrain.py` (under torchrun / deepspeed) and
`megatrain pretrain` run in every process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatrain.config import Config, save_config
from megatrain.distributed import all_reduce_sum, barrier
from megatrain.engine import checkpoint as ckpt
from megatrain.engine.checkpointer import Checkpointer
from megatrain.engine.deepspeed import (
    DistEnv,
    check_deepspeed_for,
    init_distributed,
    initialize,
    module_grad_norm,
    step_grad_norm,
)
from megatrain.engine.health import LossSpikeDetector, Watchdog, default_store
from megatrain.engine.metrics import MetricsLogger, Throughput, compile_line, device_peak_flops, kernel_paths_line
from megatrain.engine.validate import Validator
from megatrain.engine.resilience import (
    RunLock,
    StopRequest,
    auto_resume_enabled,
    check_run_lock,
    fault_point,
    fault_spec,
)
from megatrain.env import local_world_size as env_local_world
from megatrain.env import rank as env_rank
from megatrain.env import world_size as env_world
from megatrain.errors import CheckpointError, ConfigError, MegatrainError
from megatrain.optim import build_optimizer
from megatrain.optim.deepspeed_adapter import drop_step_on_device
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
            ckpt.needs_reshard(
                meta,
                path,
                model_cfg,
                cfg.parallel.zero_stage,
                world_size // (cfg.parallel.tensor * cfg.parallel.pipeline),
                cfg.parallel.tensor,
                pipeline=cfg.parallel.pipeline,
            )
        if meta["step"] >= cfg.train.steps:
            raise CheckpointError(
                f"checkpoint '{path}' is at step {meta['step']}, the run has "
                f"train.steps={cfg.train.steps}: nothing left to train"
            )
    elif cfg.train.init_from is not None:
        _check_init_from(cfg)
    return path


def _check_init_from(cfg: Config) -> None:
    """train.init_from: its model is this run's model and its tokenizer (when it carries one) is data.tokenizer."""
    from megatrain.engine.load import source_model

    source = cfg.train.init_from
    saved, tokenizer = source_model(source)
    model_cfg = cfg.model.resolved()
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = saved.vocab_size
    ckpt.check_model({"model": dataclasses.asdict(saved)}, source, model_cfg)
    ckpt.check_tokenizer(cfg.data.tokenizer, tokenizer, f"train.init_from '{source}' ({tokenizer})")


class Trainer:
    """The pretraining loop. Its components decide their own timing: `checkpointer` (checkpoint.every, the
    last step, a stop), `validator` (log.eval_every, train.steps), `logger` (log.every), the analysis hook
    (log.analyze_every) and the heartbeat (log.heartbeat_every); `fit` runs `train_step` and asks them."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        resume_path: Optional[str],
        instruments=None,
        watchdog: Optional[Watchdog] = None,
        resume_hint: str = "continue with --resume",
    ):
        self.cfg, self.env = cfg, env
        # log.analyze_every: a callable trainer -> metrics (megatrain.analysis.live, above this layer)
        self.instruments = instruments
        self.watchdog = watchdog
        self.resume_hint = resume_hint  # how the command that runs this loop continues it after a stop
        self.stop = StopRequest()
        self.stop_agreed = False
        self.spikes = LossSpikeDetector(cfg.train.spike_window, cfg.train.spike_zscore)
        self._host_sums: Optional[torch.Tensor] = None  # pinned: the step's loss sums, read after a CUDA step
        self.last_step_end = time.monotonic()
        self.groups = self._build_groups()
        self.dp_size, self.dp_rank = self.groups.dp_size, self.groups.dp_rank
        if env.is_main:
            os.makedirs(cfg.run.dir, exist_ok=True)
        self.model_cfg = self._open_data()
        if env.is_main:
            save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
        weights_only = resume_path is not None and bool(ckpt.read_meta(resume_path).get("weights_only"))
        init_path = resume_path if weights_only else (cfg.train.init_from if resume_path is None else None)
        self._build_engine(resume_path, weights_only, init_path)
        self.pipeline = None  # parallel.pipeline > 1: the step is the pipeline engine's train_batch
        if cfg.parallel.pipeline > 1:
            from megatrain.engine.pipeline import PipelineSteps

            self.pipeline = PipelineSteps(self)
        self._build_components()
        if resume_path is not None and not weights_only:
            self._resume(resume_path)
        self.logger = MetricsLogger(
            cfg.run.dir,
            enabled=env.is_main,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total_steps=cfg.train.steps,
            start_step=self.step,
            every=cfg.log.every,
        )
        self._say_where_it_started(resume_path, init_path)

    def _build_groups(self):
        """TP x context x DP process groups, or DeepSpeed's pipe x data x model topology when pipelined
        (megatrain.parallel.groups, megatrain.parallel.pipeline)."""
        p = self.cfg.parallel
        if p.pipeline > 1:
            from megatrain.parallel.pipeline import build_pipeline_groups

            return build_pipeline_groups(p.tensor, p.pipeline)
        from megatrain.parallel.groups import build_groups

        return build_groups(p.tensor, context=p.context)

    def _say_where_it_started(self, resume_path: Optional[str], init_path: Optional[str]) -> None:
        if init_path is not None:
            self.logger.message(f"started from the weights of {init_path} (fresh optimizer, step 0)")
        elif resume_path is not None:
            how = (
                f" (resharded to parallel.tensor={self.cfg.parallel.tensor} x {self.dp_size} data-parallel ranks "
                f"x {self.cfg.parallel.pipeline} pipeline stages through DeepSpeed's universal checkpoint)"
                if self.universal
                else ""
            )
            self.logger.message(f"resumed from {resume_path} at step {self.step}{how}")

    def _open_data(self):
        """Tokenizer and token caches (one process per node builds them, the rest wait, then memory-map);
        returns the model config with the vocabulary size resolved and checked."""
        from megatrain.data import open_data, prepare_data
        from megatrain.parallel.checks import check_vocab_split

        cfg = self.cfg
        if self.env.local_rank == 0:
            prepare_data(cfg)
        barrier()
        self.data = open_data(cfg)
        model_cfg = cfg.model.resolved()
        if model_cfg.vocab_size is None:
            model_cfg.vocab_size = self.data.vocab_size
        elif model_cfg.vocab_size < self.data.vocab_size:
            raise ConfigError(
                f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {self.data.vocab_size}"
            )
        check_vocab_split(
            model_cfg.vocab_size,
            cfg.parallel.tensor,
            f"model.vocab_size={model_cfg.vocab_size}"
            if cfg.model.vocab_size is not None
            else f"the tokenizer's vocabulary {model_cfg.vocab_size}",
        )
        return model_cfg

    def _build_engine(self, resume_path: Optional[str], weights_only: bool, init_path: Optional[str]) -> None:
        """The model (each rank materialises only its share: TP slices, ZeRO-3 partitions, every module from a
        generator keyed by (train.seed, its name), so any layout starts from the single-process weights), its
        optimizer and the DeepSpeed engine; `self.universal` when the resume needs a reshard."""
        from megatrain.engine.build import build_model, model_counts

        cfg, model_cfg = self.cfg, self.model_cfg
        self.universal = False
        if resume_path is not None and not weights_only:
            self.universal = ckpt.needs_reshard(
                ckpt.read_meta(resume_path),
                resume_path,
                model_cfg,
                cfg.parallel.zero_stage,
                self.dp_size,
                cfg.parallel.tensor,
                pipeline=cfg.parallel.pipeline,
            )
        # A reshard restores what the optimizer holds from DeepSpeed's universal checkpoint; frozen weights
        # (ReLoRA/LoRA's W) have no optimizer state there, so they come from the checkpoint's full
        # model.safetensors, each rank keeping its slice (the trainable ones are then overwritten).
        state_from = (
            init_path
            if init_path is not None
            else (resume_path if self.universal and model_cfg.linear in FROZEN_BASE_KINDS else None)
        )
        initial_state = None
        if state_from is not None:  # an imported run or train.init_from: full weights, each rank keeps its share
            from megatrain.engine.load import read_weights

            initial_state = read_weights(state_from)[1]
        self.num_params, self.flops_per_token = model_counts(model_cfg, cfg.data.seq_len)
        model = build_model(cfg, model_cfg, self.groups, initial_state=initial_state, source=state_from)
        del initial_state
        torch.manual_seed(cfg.train.seed)  # what trains randomly (LoRA dropout) starts alike at every layout
        self.relora = relora_controller(cfg, model)  # model.linear=relora: restarts (before the optimizer)
        self.optimizer = build_optimizer(cfg.optim, model, cfg.train.lr, on_cuda=self.env.device.type == "cuda")
        # The universal-checkpoint patterns name only what the optimizer holds (a frozen W has no ZeRO state).
        if cfg.parallel.pipeline == 1:  # a pipeline stage carries its own (megatrain.parallel.pipeline)
            model.universal_checkpoint_info = universal_checkpoint_info(
                model, held={id(p) for group in self.optimizer.param_groups for p in group["params"]}
            )
        # A PipelineModule brings DeepSpeed its own topology (DP x PP x TP) as the mpu.
        split = cfg.parallel.tensor > 1 or cfg.parallel.context > 1  # TP and Ulysses: the mpu's groups
        mpu = self.groups if split and cfg.parallel.pipeline == 1 else None
        self.engine = initialize(cfg, model, self.optimizer, mpu=mpu, load_universal=self.universal)
        if cfg.train.compile:
            self.engine.compile(backend=cfg.train.compile_backend)

    def _build_components(self) -> None:
        """The sampler and the components that decide their own timing: checkpointer, validator, throughput."""
        from megatrain.data.sampler import ResumableSampler

        cfg, t = self.cfg, self.cfg.train
        # The ranks of a context group (parallel.context) read the same blocks: data_rank, not dp_rank.
        self.sampler = ResumableSampler(
            len(self.data.train), t.global_batch, t.micro_batch, self.groups.data_rank, self.groups.data_size, t.seed
        )
        self.step = 0
        self.nonfinite_streak = 0
        self.checkpointer = Checkpointer(
            self.engine,
            run_dir=cfg.run.dir,
            every=cfg.checkpoint.every,
            keep=cfg.checkpoint.keep,
            env=self.env,
            groups=self.groups,
            model_cfg=self.model_cfg,
            parallel=cfg.parallel,
            seq_len=cfg.data.seq_len,
            seed=t.seed,
            tokenizer_path=self.data.tokenizer.path,
            state=self._client_state,
            meta=lambda: {"consumed_samples": self.sampler.state_dict()["consumed_samples"]},
            watchdog=self.watchdog,
        )
        self.validator = Validator(
            self.data.val,
            micro_batch=t.micro_batch,
            batches=cfg.log.eval_batches,
            dp_rank=self.groups.data_rank,
            dp_size=self.groups.data_size,
            device=self.env.device,
            every=cfg.log.eval_every,
            last_step=t.steps,
            context=cfg.parallel.context,
        )
        self.throughput = Throughput(
            t.global_batch * cfg.data.seq_len,
            self.flops_per_token,
            self.env.world_size,
            device_peak_flops(self.env.device),
            self.env.device,
        )
        analyze = cfg.log.analyze_every if self.instruments is not None else 0
        self.hooks = [
            StepHook(self.validator.should_validate, self.evaluate, skip_on_abort=True),
            StepHook(every(analyze), lambda: self.instruments(self)),
            StepHook(every(cfg.log.heartbeat_every), self._heartbeat),
        ]

    def _resume(self, resume_path: str) -> None:
        """Load the checkpoint to continue from (converted first when it was written at another layout)."""
        load_path = self._universal_checkpoint(resume_path) if self.universal else resume_path
        state = ckpt.load_checkpoint(self.engine, load_path, self.env.rank)
        if self.universal:
            barrier()
            if self.env.is_main:
                shutil.rmtree(os.path.join(self.cfg.run.dir, RESHARD_SCRATCH), ignore_errors=True)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.spikes.load_state_dict(state.get("loss_window", []))
        _load_projected_state(self.optimizer, state, load_path, resharded=self.universal)

    # ------------------------------------------------------------------------------------------

    def _phase(self, name: str) -> None:
        """Name what this rank does now, for the watchdog (parallel.timeout_s)."""
        if self.watchdog is not None:
            self.watchdog.phase(name, self.step + 1)

    def _batch(self, blocks, indices):
        inputs, labels = blocks.batch(indices)
        return inputs.to(self.env.device, non_blocking=True), labels.to(self.env.device, non_blocking=True)

    def forward_backward_step(self, inputs: torch.Tensor, labels: torch.Tensor, first: bool = False) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients accumulate in the engine); returns the loss, detached."""
        self._phase("forward")
        loss = self.engine(inputs, labels=labels)
        if first:
            fault_point("step", self.step + 1, self.env.rank)
        self._phase("backward")
        self.engine.backward(loss)
        return loss.detach()

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the metrics of the step."""
        engine = self.engine
        lr = lr_for_config(self.cfg.train, self.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        if self.relora is not None:
            self.relora.before_step(engine, self.step)
        micro = self.sampler.next_step()
        if self.pipeline is not None:  # DeepSpeed's 1F1B schedule runs every micro-batch and the step
            return self._step_record(lr, *self.pipeline.train_step(micro))
        losses = []
        # A lean DeepSpeed step (megatrain_device_drop: every ZeRO stage without offload, stage 0 in bf16) takes
        # the skip decision on the device and the host reads it after the step; any other gets it before.
        agree = self._agree_on_device if getattr(engine.optimizer, "megatrain_device_drop", False) else None
        for i, indices in enumerate(micro):
            losses.append(self.forward_backward_step(*self._batch(self.data.train, indices), first=i == 0))
            if i == len(micro) - 1:
                agreed = (agree or self._agree_before_step)(self._loss_sums(losses), len(micro))
            self._phase("optimizer step")
            engine.step()
        return self._step_record(lr, *(agreed() if agree else agreed))

    def _loss_sums(self, losses: list) -> torch.Tensor:
        """[sum of the finite micro-batch losses, non-finite count, 0 (the stop flag, set later)] in fp64, from
        the step's 0-dim losses at once: tensor ops only, no host sync (one host read after the all-reduce)."""
        stacked = torch.stack(losses).double()
        finite = torch.isfinite(stacked)
        counts = torch.stack((stacked.where(finite, 0.0).sum(), finite.logical_not().sum().double()))
        return torch.cat((counts, counts.new_zeros(1)))

    def _all_reduce_sums(self, local: torch.Tensor) -> None:
        """Set this rank's stop flag in `local` ([loss sum, non-finite count, stop]) and sum it over the world."""
        self._phase("all-reduce of the loss")
        local[2] = 1.0 if self.stop.signum else 0.0
        all_reduce_sum(local)

    def _global_loss(self, loss_sum, micro_batches: int):
        """The step's loss from the world's sum (a float, or a device tensor: the same fp64 operations in the same
        order). Summed over the world: the TP ranks of a group hold the same loss, so divide by all ranks; the
        ranks of a context group hold parts that sum to one loss (megatrain.parallel.context_parallel)."""
        return loss_sum * self.cfg.parallel.context / (micro_batches * self.env.world_size)

    def _agree_before_step(self, local: torch.Tensor, micro_batches: int) -> tuple:
        """Before the last micro-batch's (collective) step, every DP rank agrees whether to apply it and all
        ranks whether to stop after it: one all-reduce. Returns (loss, non-finite count, spike z, grad norm)."""
        self._all_reduce_sums(local)
        loss_sum, nonfinite, stop = local.tolist()
        loss_value = self._global_loss(loss_sum, micro_batches)
        self.stop_agreed = stop > 0
        spike_z = None if nonfinite else self.spikes.score(loss_value)
        self.optimizer.skip_next_step = nonfinite > 0 or (spike_z is not None and self.cfg.train.spike_skip)
        measured = None  # ZeRO stage 0: DeepSpeed keeps no gradient norm, so it is taken before the step
        if not self.optimizer.skip_next_step and self.cfg.parallel.zero_stage == 0:
            measured = module_grad_norm(self.engine.module, self.groups)
        return loss_value, nonfinite, spike_z, measured

    def _agree_on_device(self, local: torch.Tensor, micro_batches: int) -> Callable[[], tuple]:
        """What `_agree_before_step` agrees on, without its host read before the step: after the all-reduce,
        the decision to drop the update (a non-finite loss anywhere, or a loss spike with train.spike_skip)
        is a device tensor handed to the lean DeepSpeed optimizer, which folds it into the gradient norm it
        reads anyway (megatrain.optim.deepspeed_adapter.drop_step_on_device). The sums and the decision
        are copied to the host without blocking; the callable returned reads them after `engine.step()`
        and gives `_agree_before_step`'s tuple plus whether the update was applied."""
        self._all_reduce_sums(local)
        loss = self._global_loss(local[0], micro_batches)  # on the device, as the host computes it below
        drop = local[1] > 0
        stats = self.spikes.stats() if self.cfg.train.spike_skip else None
        if stats is not None:
            mean, std = stats
            drop = drop | ((loss - mean) / std > self.spikes.zscore)
        drop_step_on_device(self.engine.optimizer, drop)
        sums = torch.cat((local, drop.double().reshape(1)))
        ready = None
        if sums.device.type == "cuda":  # to pinned memory behind the step's work: read once the step has synced
            if self._host_sums is None:
                self._host_sums = torch.empty(4, dtype=torch.float64, pin_memory=True)
            sums = self._host_sums.copy_(sums, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()

        def after_step() -> tuple:
            if ready is not None:
                ready.synchronize()  # long done: the step read its gradient norm after this copy
            loss_sum, nonfinite, stop, dropped = sums.tolist()
            loss_value = self._global_loss(loss_sum, micro_batches)
            self.stop_agreed = stop > 0
            spike_z = None if nonfinite else self.spikes.score(loss_value)
            return loss_value, nonfinite, spike_z, None, not dropped

        return after_step

    def _step_record(
        self, lr: float, loss_value: float, nonfinite: float, spike_z, measured, applied: Optional[bool] = None
    ) -> dict:
        """After the step: the step's metrics, the non-finite streak and the loss-spike window. `applied`: whether
        the update was applied, when the device decided it (else the host's `skip_next_step` says)."""
        if applied is None:
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
                # Kept on the device: read only if this step is logged (no host sync after the step).
                record["grad_norm"] = step_grad_norm(self.engine, self.cfg.parallel.zero_stage, measured, read=False)
        now = time.monotonic()
        self.step_seconds, self.last_step_end = now - self.last_step_end, now
        return record

    def evaluate(self) -> Optional[dict]:
        """Validation loss / perplexity (and the tasks' answer accuracy) over log.eval_batches; None without
        validation data. Collective."""
        if self.data.val is None:
            return None
        self._phase("evaluate")
        return self.validator.validate(self.engine if self.pipeline is None else self.pipeline.evaluator)

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
                    checkpoint, os.path.join(scratch, "universal")
                )
                folder = reshard.universal_for_layout(
                    folder, self.cfg.parallel.tensor, self.model_cfg.kv_heads, os.path.join(scratch, "view")
                )
            except MegatrainError as exc:
                error = str(exc)
        shared = [error, folder]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise CheckpointError(shared[0])
        return shared[1]

    def _client_state(self) -> dict:
        """What a checkpoint carries for this loop to continue: step, data position, the health state."""
        client = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
            "loss_window": self.spikes.state_dict(),
        }
        if getattr(self.optimizer, "projected", None) is not None:  # GaLore / Fira weights live outside ZeRO
            client["projected_optimizer"] = self.optimizer.projected.state_dict()
        return client

    def fit(self) -> dict:
        """Train to train.steps (or train.stop_after, or a stop signal); returns the last logged record."""
        t = self.cfg.train
        end = t.stop_after if t.stop_after is not None else t.steps
        last: dict = {}
        self.throughput.reset()
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
                    if self.cfg.train.compile:  # and what torch.compile made of the model
                        self.logger.message(compile_line(self.cfg.train.compile_backend))
                    first = False
                self.throughput.add_step()
                abort = self._report_events(record)
                final = self.step == end
                last = self._log_step(record, final, abort) or last
                self.logger.advance()
                if abort:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_streak} non-finite losses in a row at step {self.step} "
                        f"(train.max_nonfinite={t.max_nonfinite}); lower train.lr or check the data"
                    )
                if self._checkpoint(final):
                    break
        finally:
            self.stop.restore()
            self.logger.close()
        return last

    def _report_events(self, record: dict) -> bool:
        """Say what went wrong in the step (a skipped update, a loss spike); True when the run must abort."""
        t = self.cfg.train
        if record["skipped"]:
            self.logger.message(
                f"step {self.step}: non-finite loss, update skipped "
                f"({self.nonfinite_streak} in a row, limit {t.max_nonfinite})"
            )
        if "spike_z" in record:
            self.logger.message(
                f"step {self.step}: loss spike {record['loss']:.4g} (z={record['spike_z']:.1f} "
                f"over the last {len(self.spikes.history)} losses)" + (", update skipped" if t.spike_skip else "")
            )
        return record["skipped"] and self.nonfinite_streak >= t.max_nonfinite

    def _log_step(self, record: dict, final: bool, abort: bool) -> Optional[dict]:
        """Log the step's record when the logger's schedule, an event (a skipped update, a loss spike) or a
        component with something to add (validator, analysis hook, heartbeat) asks for it. Returns the
        record logged, or None."""
        due = [hook for hook in self.hooks if hook.due(self.step) and not (abort and hook.skip_on_abort)]
        if not (self.logger.should_log(self.step, last_step=final) or due or record["skipped"] or "spike_z" in record):
            return None
        if isinstance(record["grad_norm"], torch.Tensor):
            record["grad_norm"] = record["grad_norm"].item()
        record.update(self.throughput.measure(self.step))
        for hook in due:
            record.update(hook.run() or {})
        record.pop("skipped")
        self.logger.log(record)
        self.throughput.reset()
        return record

    def _checkpoint(self, final: bool) -> bool:
        """Save when the checkpointer's schedule says so (or a stop was agreed); True when the loop must stop."""
        path = self.checkpointer.save(self.step, last_step=final or self.stop_agreed)
        if path is None:
            return False
        self.logger.message(f"saved checkpoint {path}")
        self.throughput.reset()
        if self.stop_agreed and not final:
            why = f"{self.stop.name} received" if self.stop.signum else "a stop signal on another rank"
            self.logger.message(f"stopped at step {self.step} ({why}); checkpoint {path}; {self.resume_hint}")
            return True
        return False

    def _heartbeat(self) -> dict:
        """{heartbeat: [{rank, since_last_step_s}]} for every rank: seconds since it finished its previous step
        (collective)."""
        self._phase("heartbeat")
        mine = torch.tensor([self.step_seconds], dtype=torch.float64, device=self.env.device)
        parts = [mine]
        if dist.is_initialized() and self.env.world_size > 1:
            parts = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
            dist.all_gather(parts, mine)
        return {
            "heartbeat": [
                {"rank": rank, "since_last_step_s": round(seconds.item(), 4)} for rank, seconds in enumerate(parts)
            ]
        }


@dataclasses.dataclass
class StepHook:
    """A source of metrics for some steps' records: `due(step)` is its own timing, `run()` what it adds."""

    due: Callable[[int], bool]
    run: Callable[[], Optional[dict]]
    skip_on_abort: bool = False  # not run at a step that ends the run (too many non-finite losses)


def every(n: int) -> Callable[[int], bool]:
    """The schedule "every n steps" (n <= 0: never)."""
    return lambda step: n > 0 and step % n == 0


def _load_projected_state(optimizer, state: dict, path: str, resharded: bool) -> None:
    """GaLore / Fira state of the weights kept outside ZeRO (projections, moments, step counters)."""
    projected = getattr(optimizer, "projected", None)
    if projected is None:
        return
    if resharded:
        # Projections of other TP shards do not apply: the new layout starts them afresh.
        return
    if "projected_optimizer" not in state:
        raise CheckpointError(
            f"checkpoint '{path}' holds no GaLore/Fira optimizer state (was it written with another optim.name?)"
        )
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
        raise ConfigError(
            "log.analyze_every needs the analysis instruments: run `megatrain pretrain`, or pass "
            "instruments=megatrain.analysis.live.training_instruments(cfg) to pretrain()"
        )
    world = env_world()
    is_rank0 = env_rank() == 0
    resume_path = preflight(cfg, resume, world)
    lock = RunLock(cfg.run.dir).acquire() if is_rank0 else None
    watchdog = None
    try:
        env = init_distributed(cfg)
        if env.world_size > 1:
            watchdog = Watchdog(
                cfg.parallel.timeout_s,
                env.rank,
                env.world_size,
                store=default_store(),
                on_timeout=lock.release if lock is not None else None,
            ).start()
        trainer = Trainer(cfg, env, resume_path, instruments=instruments, watchdog=watchdog, resume_hint=resume_hint)
        return trainer.fit()
    finally:
        if watchdog is not None:
            watchdog.stop()
        if lock is not None:
            lock.release()
