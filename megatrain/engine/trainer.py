"""The pretraining loop: config -> data + model -> DeepSpeed engine -> steps -> logs and checkpoints.

`pretrain(cfg, resume)` is what `launch/pretrain.py` (under torchrun / deepspeed) and
`megatrain pretrain` run in every process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatrain.config import Config, save_config
from megatrain.engine import checkpoint as ckpt
from megatrain.engine.deepspeed import DistEnv, init_distributed, initialize, use_bf16
from megatrain.engine.metrics import MetricsLogger, device_peak_flops, mfu
from megatrain.errors import CheckpointError, ConfigError, MegatrainError
from megatrain.optim import build_optimizer
from megatrain.optim.schedules import lr_for_config


class NonFiniteLossError(MegatrainError):
    """Too many non-finite losses in a row (train.max_nonfinite)."""


def preflight(cfg: Config, resume, world_size: int) -> Optional[str]:
    """Every check that needs no process group: batch arithmetic, run dir, resume checkpoint.

    Returns the checkpoint directory to resume from (or None). Raises MegatrainError (one line).
    """
    from megatrain.data.dataset import check_sources

    cfg.resolve_batch(world_size)
    check_sources(cfg)
    if os.path.exists(cfg.run.dir) and not os.path.isdir(cfg.run.dir):
        raise ConfigError(f"run.dir '{cfg.run.dir}' exists and is not a directory")
    path = ckpt.find_resume_checkpoint(cfg.run.dir, resume)
    if path is not None:
        meta = ckpt.read_meta(path)
        model_cfg = cfg.model.resolved()
        if model_cfg.vocab_size is None:
            model_cfg.vocab_size = meta["model"].get("vocab_size")
        ckpt.check_compatible(meta, path, model_cfg, cfg.parallel.zero_stage, world_size // cfg.parallel.tensor,
                              cfg.parallel.tensor)
        if meta["step"] >= cfg.train.steps:
            raise CheckpointError(f"checkpoint '{path}' is at step {meta['step']}, the run has "
                                       f"train.steps={cfg.train.steps}: nothing left to train")
    return path


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, resume_path: Optional[str]):
        from megatrain.data.dataset import ResumableSampler, open_data, prepare_data
        from megatrain.models.transformer import Transformer

        self.cfg, self.env = cfg, env
        self.dp_size = env.world_size // cfg.parallel.tensor
        self.dp_rank = env.rank // cfg.parallel.tensor
        if env.is_main:
            os.makedirs(cfg.run.dir, exist_ok=True)
        # One process per node builds the tokenizer and token caches; the rest wait, then memory-map.
        if env.local_rank == 0:
            prepare_data(cfg)
        _barrier()
        self.data = open_data(cfg)

        model_cfg = cfg.model.resolved()
        if model_cfg.vocab_size is None:
            model_cfg.vocab_size = self.data.vocab_size
        elif model_cfg.vocab_size < self.data.vocab_size:
            raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                              f"{self.data.vocab_size}")
        self.model_cfg = model_cfg
        if env.is_main:
            save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))

        torch.manual_seed(cfg.train.seed)
        model = Transformer(model_cfg)
        model.gradient_checkpointing = cfg.train.activation_checkpointing
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.num_params = model.num_params(non_embedding=False)
        self.optimizer = build_optimizer(cfg.optim, model, cfg.train.lr, on_cuda=env.device.type == "cuda")
        self.engine = initialize(cfg, model, self.optimizer)
        self.sampler = ResumableSampler(len(self.data.train), cfg.train.global_batch, cfg.train.micro_batch,
                                        self.dp_rank, self.dp_size, cfg.train.seed)
        self.step = 0
        self.nonfinite_streak = 0
        if resume_path is not None:
            state = ckpt.load_checkpoint(self.engine, resume_path, env.rank)
            self.step = int(state["step"])
            self.sampler.load_state_dict(state["sampler"])
            self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.peak = device_peak_flops(env.device)
        self.logger = MetricsLogger(cfg.run.dir, enabled=env.is_main, tensorboard=cfg.log.tensorboard,
                                    progress=cfg.log.progress, total_steps=cfg.train.steps, start_step=self.step)
        if resume_path is not None:
            self.logger.message(f"resumed from {resume_path} at step {self.step}")

    # ------------------------------------------------------------------------------------------

    def _batch(self, blocks, indices):
        inputs, labels = blocks.batch(indices)
        return inputs.to(self.env.device, non_blocking=True), labels.to(self.env.device, non_blocking=True)

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the metrics of the step."""
        cfg, engine = self.cfg, self.engine
        lr = lr_for_config(cfg.train, self.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        micro = self.sampler.next_step()
        local = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # [sum of losses, non-finite count]
        for i, indices in enumerate(micro):
            inputs, labels = self._batch(self.data.train, indices)
            loss = engine(inputs, labels=labels)
            detached = loss.detach().double()
            finite = torch.isfinite(detached)
            # Tensor ops only: no host sync per micro-batch; one .item() after the all-reduce below.
            local[0] += torch.where(finite, detached, torch.zeros_like(detached))
            local[1] += (~finite).double()
            engine.backward(loss)
            if i == len(micro) - 1:
                # Every DP rank must agree before the (collective) step whether to apply it.
                _all_reduce_sum(local)
                self.optimizer.skip_next_step = bool(local[1].item() > 0)
                if not self.optimizer.skip_next_step and cfg.parallel.zero_stage == 0:
                    grad_norm = _local_grad_norm(engine.module)
            engine.step()
        skipped = self.optimizer.skip_next_step
        self.optimizer.skip_next_step = False
        self.step += 1
        if skipped:
            self.nonfinite_streak += 1
            loss_value, grad_norm = float("nan"), None
        else:
            self.nonfinite_streak = 0
            loss_value = local[0].item() / (len(micro) * self.dp_size)
            if cfg.parallel.zero_stage != 0:
                grad_norm = engine.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.item()
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "skipped": skipped}

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        from megatrain.data.dataset import val_batches

        if self.data.val is None:
            return None
        engine = self.engine
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for indices in val_batches(self.data.val, self.cfg.train.micro_batch, self.dp_rank, self.dp_size,
                                   self.cfg.log.eval_batches):
            inputs, labels = self._batch(self.data.val, indices)
            total[0] += engine(inputs, labels=labels).float()
            total[1] += 1
        engine.train()
        _all_reduce_sum(total)
        val_loss = (total[0] / total[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def save(self) -> str:
        cfg = self.cfg
        meta = {"model": dataclasses.asdict(self.model_cfg),
                "layout": {"world_size": self.env.world_size, "dp": self.dp_size, "tensor": cfg.parallel.tensor,
                           "zero_stage": cfg.parallel.zero_stage},
                "consumed_samples": self.sampler.state_dict()["consumed_samples"],
                "seq_len": cfg.data.seq_len, "seed": cfg.train.seed, "tokenizer": self.data.tokenizer.path}
        client = {"step": self.step, "sampler": self.sampler.state_dict(), "nonfinite_streak": self.nonfinite_streak}
        path = ckpt.save_checkpoint(self.engine, run_dir=cfg.run.dir, step=self.step, client_state=client, meta=meta,
                                    keep=cfg.checkpoint.keep, rank=self.env.rank,
                                    tokenizer_path=self.data.tokenizer.path)
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
            while self.step < end:
                record = self.train_step()
                window_tokens += tokens_per_step
                skipped = record["skipped"]
                abort = skipped and self.nonfinite_streak >= t.max_nonfinite
                if skipped:
                    self.logger.message(f"step {self.step}: non-finite loss, update skipped "
                                        f"({self.nonfinite_streak} in a row, limit {t.max_nonfinite})")
                final = self.step == end
                do_eval = not abort and (cfg.log.eval_every > 0 and self.step % cfg.log.eval_every == 0
                                         or self.step == t.steps)
                if self.step % cfg.log.every == 0 or final or do_eval or skipped:
                    if self.env.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_start
                    tps = window_tokens / elapsed if elapsed > 0 else 0.0
                    record.update(tokens_per_s=tps, mfu=mfu(tps, self.flops_per_token, self.env.world_size, self.peak),
                                  tokens=self.step * tokens_per_step)
                    if do_eval:
                        record.update(self.evaluate() or {})
                    record.pop("skipped")
                    self.logger.log(record)
                    last = record
                    window_start, window_tokens = time.perf_counter(), 0
                self.logger.advance()
                if abort:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_streak} non-finite losses in a row at step {self.step} "
                        f"(train.max_nonfinite={t.max_nonfinite}); lower train.lr or check the data")
                if final or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save()
                    window_start, window_tokens = time.perf_counter(), 0
        finally:
            self.logger.close()
        return last


def _local_grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of the (already DP-averaged) gradients, for ZeRO stage 0 where DeepSpeed reports none."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def pretrain(cfg: Config, resume=None) -> dict:
    """Run (or resume) a pretraining job in this process; returns the last logged metrics."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resume_path = preflight(cfg, resume, world)
    env = init_distributed(cfg)
    trainer = Trainer(cfg, env, resume_path)
    return trainer.fit()
