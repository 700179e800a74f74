"""One excursion: a pipeline (megatrain.rl.pipelines) run from one start checkpoint, in its own sub-run folder.

The start weights come from `megatrain.load`; they are wrapped in a DeepSpeed engine (ZeRO / TP from
parallel.*) with the pipeline's optimizer; rollouts are `megatrain.generate` on the engine's module
(megatrain.rl.rollout); checkpoints are the engine's `Checkpointer`, logs its `MetricsLogger`.

An iteration is one SFT update (the pipeline's first `sft_iterations`) or an RL iteration: a rollout of
rl.group_size completions for each of rl.prompts_per_step prompts, then rl.ppo_epochs passes of optimizer
updates over mini-batches of rl.mini_batch sequences (`Pipeline.update` each). The prompts of mini-batch j
are split over the DP ranks, each rank generating and training on its share; losses are normalised by
counts over the whole mini-batch, so any process count computes the same update (up to float summation
order).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatrain.config import Config, save_config
from megatrain.distributed import all_reduce_sum
from megatrain.engine import checkpoint as ckpt
from megatrain.engine.checkpointer import Checkpointer
from megatrain.engine.deepspeed import step_grad_norm
from megatrain.engine.load import load_for_inference
from megatrain.engine.metrics import MetricsLogger
from megatrain.engine.resilience import StopRequest
from megatrain.engine.trainer import resolve_config
from megatrain.errors import CheckpointError
from megatrain.rl import grpo
from megatrain.rl.evaluation import evaluate
from megatrain.rl.pipelines import get_pipeline
from megatrain.rl.rewards import load_reward
from megatrain.rl.rollout import Rollout, collect_rollout, pad_sequences
from megatrain.rl.starts import Start


def stop_agreed(stop: Optional[StopRequest], env) -> bool:
    """Whether any rank received a stop signal (SIGTERM / SIGUSR1): a one-number all-reduce, so every rank
    stops at the same point. Collective."""
    if stop is None:
        return False
    flag = torch.tensor([1.0 if stop.signum else 0.0], dtype=torch.float64, device=env.device)
    return all_reduce_sum(flag).item() > 0


class Excursion:
    """A pipeline from one start checkpoint, in `run_dir`. `pipeline` is its name in rl.pipeline; `strategy`
    the Pipeline that decides what is updated when, with which loss."""

    def __init__(self, cfg: Config, env, start: Start, pipeline: str, run_dir: str, problems, groups):
        self.cfg, self.env, self.start, self.run_dir = cfg, env, start, run_dir
        self.rl, self.groups = cfg.rl, groups
        self.pipeline = pipeline
        self.dp_size, self.dp_rank = groups.dp_size, groups.dp_rank
        self.train_problems, self.held_out = problems
        self.reward_fn = load_reward(cfg.rl.reward, cfg.rl.format_score)
        self._build_engine()
        self.sft_iterations = self.strategy.sft_iterations(self.rl)
        self.iterations = self.sft_iterations + self.strategy.rl_iterations(self.rl)
        self.total_updates = self.updates_before(self.iterations)
        resume_path = self._resume()
        if env.is_main:
            os.makedirs(run_dir, exist_ok=True)
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
        self.checkpointer = Checkpointer(
            self.engine,
            run_dir=run_dir,
            every=cfg.checkpoint.every,
            keep=cfg.checkpoint.keep,
            env=env,
            groups=groups,
            model_cfg=self.model_cfg,
            parallel=cfg.parallel,
            seq_len=cfg.data.seq_len,
            seed=cfg.rl.seed,
            tokenizer_path=self.tokenizer.path,
            state=lambda: {"step": self.it},
            meta=lambda: {
                "rl": {"start": os.path.abspath(start.path), "start_step": start.step, "pipeline": self.pipeline}
            },
        )
        self.logger = MetricsLogger(
            run_dir,
            enabled=env.is_main,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total_steps=self.iterations,
            start_step=self.it,
            every=cfg.log.every,
            tb_prefix="rl",
        )
        if resume_path is not None:
            self.logger.message(f"resumed {pipeline} from {resume_path} at iteration {self.it}")

    @property
    def pipeline(self) -> str:
        return self.strategy.name

    @pipeline.setter
    def pipeline(self, name: str) -> None:
        self.strategy = get_pipeline(name)

    def _build_engine(self) -> None:
        """The start weights in a DeepSpeed engine with the pipeline's optimizer; one optimizer step is
        rl.mini_batch sequences (DeepSpeed's batch bookkeeping); the KL reference model when needed."""
        from megatrain.engine.deepspeed import initialize
        from megatrain.parallel.parallelize import parallelize

        cfg, env, groups = self.cfg, self.env, self.groups
        model, self.tokenizer, self.model_cfg = load_for_inference(self.start.path, device=env.device)
        model.train()
        self.ref_model = None
        if self.rl.kl_coef > 0 and self.strategy.rollouts:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        parallelize(model, groups, sequence_parallel=cfg.parallel.sequence)
        if self.ref_model is not None and groups.tp_size > 1:
            parallelize(self.ref_model, groups, sequence_parallel=cfg.parallel.sequence)
        rollout = self.rl.prompts_per_step * self.rl.group_size
        self.mini = self.rl.mini_batch or rollout
        self.local_mini = self.mini // self.dp_size
        self.micro = min(self.rl.micro_batch, self.local_mini)
        self.gas = self.local_mini // self.micro
        self.updates_per_rl_iteration = self.rl.ppo_epochs * (rollout // self.mini)
        ds_cfg = copy.deepcopy(cfg)
        ds_cfg.train.micro_batch, ds_cfg.train.global_batch, ds_cfg.train.grad_accum = self.micro, self.mini, None
        resolve_config(ds_cfg, env.world_size)
        self.optimizer = self.strategy.build_optimizer(cfg, model, on_cuda=env.device.type == "cuda")
        self.engine = initialize(ds_cfg, model, self.optimizer, mpu=groups if cfg.parallel.tensor > 1 else None)

    def _resume(self) -> Optional[str]:
        """Continue from this sub-run's latest checkpoint, if any (same start, model and layout only)."""
        self.it = 0
        path = ckpt.find_resume_checkpoint(self.run_dir, True)
        if path is None:
            return None
        meta = ckpt.read_meta(path)
        if meta.get("rl", {}).get("start") != os.path.abspath(self.start.path) or meta["model"] != dataclasses.asdict(
            self.model_cfg
        ):
            raise CheckpointError(
                f"checkpoint '{path}' was written from another start checkpoint or model "
                f"({meta.get('rl', {}).get('start')}) than '{self.start.path}'"
            )
        if ckpt.needs_reshard(
            meta, path, self.model_cfg, self.cfg.parallel.zero_stage, self.dp_size, self.cfg.parallel.tensor
        ):
            raise CheckpointError(
                f"checkpoint '{path}' was written at another parallel layout "
                f"({meta['layout']}); resume an RL run at the layout it started with"
            )
        self.it = int(ckpt.load_checkpoint(self.engine, path, self.env.rank)["step"])
        return path

    # -- schedule ------------------------------------------------------------------------------

    def updates_before(self, it: int) -> int:
        """Optimizer updates (learning-rate schedule steps, SFT batches) taken before iteration `it`."""
        sft = min(it, self.sft_iterations)
        return sft + max(0, it - sft) * self.updates_per_rl_iteration

    def rl_iteration(self, it: int) -> int:
        """The RL iteration number of iteration `it` (its prompts' place in the training stream)."""
        return it - self.sft_iterations

    def _set_lr(self, update: int) -> float:
        from megatrain.optim.schedules import lr_at

        t = self.cfg.train
        lr = lr_at(
            update,
            lr=t.lr,
            steps=max(1, self.total_updates),
            warmup_steps=t.warmup_steps,
            min_lr_ratio=t.min_lr_ratio,
            schedule=t.schedule,
        )
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # -- data ----------------------------------------------------------------------------------

    def _order(self, epoch: int, count: int) -> list[int]:
        g = torch.Generator().manual_seed(self.rl.seed * 1_000_003 + epoch)
        return torch.randperm(count, generator=g).tolist()

    def stream(self, start: int, count: int) -> list[int]:
        """Indices start..start+count-1 of the training problems, reshuffled each pass."""
        n = len(self.train_problems)
        return [self._order(i // n, n)[i % n] for i in range(start, start + count)]

    def local_prompts(self) -> list[int]:
        """Positions (in the iteration's global prompt list) this rank generates and trains on:
        mini-batch j's prompts split evenly over the DP ranks."""
        per_mini = self.mini // self.rl.group_size
        share = per_mini // self.dp_size
        out = []
        for j in range(self.rl.prompts_per_step // per_mini):
            base = j * per_mini + self.dp_rank * share
            out.extend(range(base, base + share))
        return out

    def gather_rows(self, local_rows: torch.Tensor, local: list[int]) -> torch.Tensor:
        """[len(local), G] rows from every DP rank -> [P, G] in global prompt order."""
        if self.dp_size == 1:
            return local_rows
        dev = self.env.device
        parts = [torch.empty(local_rows.shape, dtype=local_rows.dtype, device=dev) for _ in range(self.dp_size)]
        dist.all_gather(parts, local_rows.to(dev).contiguous(), group=self.groups.dp_group)
        out = torch.empty(self.rl.prompts_per_step, local_rows.shape[1], dtype=local_rows.dtype)
        per_mini = self.mini // self.rl.group_size
        share = per_mini // self.dp_size
        for rank, part in enumerate(parts):
            for i in range(part.shape[0]):
                j, within = divmod(i, share)
                out[j * per_mini + rank * share + within] = part[i].cpu()
        return out

    def text(self, completion: list[int]) -> str:
        return self.tokenizer.decode([t for t in completion if t != self.tokenizer.eos_id])

    def sequences(self, prompts: list[list[int]], completions: list[list[int]]):
        """Right-padded ids [B, L] and the completion mask over next-token targets [B, L-1], on this device."""
        return pad_sequences(prompts, completions, self.env.device)

    _sequences = sequences  # the name tests/rl/test_loss_mix.py drives

    def logprobs(self, module, ids: torch.Tensor):
        """log pi(next token) [B, L-1] and the entropy [B, L-1] of `module` on ids [B, L]."""
        logits = module(ids)
        return grpo.token_logprobs(logits[:, :-1], ids[:, 1:])

    # -- updates -------------------------------------------------------------------------------

    def _scale(self) -> float:
        # DeepSpeed divides each micro-batch's loss by gradient_accumulation_steps and averages
        # gradients over DP ranks; the losses here are already normalised over the whole mini-batch.
        return float(self.gas * self.dp_size)

    def rl_step(self, roll: Rollout, micro_indices: list[int], update: int, stats: torch.Tensor) -> None:
        """Backward of the RL loss (the pipeline's `loss` of it) over this rank's micro-batches `micro_indices`
        of `roll`, one optimizer step; adds [loss, entropy, clipped, KL, tokens] sums to `stats`. `roll` may
        be a dict of Rollout's fields (a hand-built rollout)."""
        roll = roll if isinstance(roll, Rollout) else Rollout(**roll)
        rl = self.rl
        masks = []
        for m in micro_indices:
            ids, mask = roll.ids_masks[m]
            keep = roll.keep[m * self.micro : (m + 1) * self.micro].to(mask)
            masks.append(mask * keep[:, None])
        norm = torch.tensor([sum(grpo.loss_normalizer(mk, rl.loss_agg) for mk in masks)], dtype=torch.float64)
        all_reduce_sum(norm)
        normalizer = max(norm.item(), 1.0)
        for position, (m, mask) in enumerate(zip(micro_indices, masks)):
            ids, _ = roll.ids_masks[m]
            adv = roll.advantages[m * self.micro : (m + 1) * self.micro].to(ids.device, torch.float32)
            logp, entropy = self.logprobs(self.engine, ids)
            pg, clipped = grpo.clipped_objective(
                logp, roll.old_logp[m], adv, clip_low=rl.clip_low, clip_high=rl.clip_high, dual_clip=rl.dual_clip
            )
            per_token, kl = pg, None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref, _ = self.logprobs(self.ref_model, ids)
                kl = grpo.kl_estimate(logp, ref, rl.kl_estimator)
                if rl.kl_in == "loss":
                    per_token = pg + rl.kl_coef * kl
            loss = grpo.aggregate(per_token, mask, rl.loss_agg, normalizer)
            loss = self.strategy.loss(self, loss, update, position)
            self.engine.backward(loss * self._scale())
            with torch.no_grad():
                stats += torch.stack(
                    [
                        loss.detach().double(),
                        (entropy * mask).sum().double(),
                        (clipped * mask).sum().double(),
                        (kl * mask).sum().double() if kl is not None else torch.zeros((), dtype=torch.float64),
                        mask.sum().double(),
                    ]
                ).cpu()
            self.engine.step()

    _rl_minibatch = rl_step  # the name tests/rl/test_loss_mix.py drives

    def sft_batch(self, update: int):
        """This rank's SFT micro-batches for SFT update number `update` (rl.mini_batch problems) and the
        mini-batch's token count (all ranks)."""
        if getattr(self, "_sft_cache", (None,))[0] != update:
            indices = self.stream(update * self.mini, self.mini)[
                self.dp_rank * self.local_mini : (self.dp_rank + 1) * self.local_mini
            ]
            probs = [self.train_problems[i] for i in indices]
            prompts = [self.tokenizer.encode(p.prompt) for p in probs]
            targets = [self.tokenizer.encode(" " + p.solution) + [self.tokenizer.eos_id] for p in probs]
            micro = [
                self.sequences(prompts[s : s + self.micro], targets[s : s + self.micro])
                for s in range(0, len(probs), self.micro)
            ]
            tokens = torch.tensor([sum(float(mk.sum()) for _, mk in micro)], dtype=torch.float64)
            all_reduce_sum(tokens)
            self._sft_cache = (update, micro, max(tokens.item(), 1.0))
        return self._sft_cache[1], self._sft_cache[2]

    def sft_micro_loss(self, update: int, m: int) -> torch.Tensor:
        """Token-mean NLL of the reference solutions (answer tokens only), normalised over the mini-batch."""
        micro, tokens = self.sft_batch(update)
        ids, mask = micro[m]
        logp, _ = self.logprobs(self.engine, ids)
        return grpo.aggregate(-logp, mask, "token-mean", tokens)

    def sft_step(self, update: int) -> float:
        """One SFT optimizer update on SFT batch `update`; returns its loss (all ranks)."""
        total = torch.zeros(1, dtype=torch.float64)
        for m in range(self.gas):
            loss = self.sft_micro_loss(update, m)
            self.engine.backward(loss * self._scale())
            total += loss.detach().double().cpu()
            self.engine.step()
        return all_reduce_sum(total).item()

    # -- iteration -----------------------------------------------------------------------------

    def iteration(self, it: int) -> dict:
        """Iteration `it` (an SFT update or an RL iteration); returns its metrics record."""
        record: dict = {"step": it + 1}
        update = self.updates_before(it)
        if it < self.sft_iterations:
            record["lr"] = self._set_lr(update)
            t0 = time.perf_counter()
            record["sft_loss"] = self.sft_step(update)
            record["update_s"] = time.perf_counter() - t0
            record["loss"] = record["sft_loss"]
            record["grad_norm"] = step_grad_norm(self.engine, self.cfg.parallel.zero_stage)
            return record
        roll = collect_rollout(self, it)
        record.update(roll.metrics)
        record.update(roll.timings)
        return self._rl_updates(record, roll, update)

    def _rl_updates(self, record: dict, roll: Rollout, update: int) -> dict:
        """rl.ppo_epochs passes over the rollout's mini-batches, one `Pipeline.update` each."""
        t0 = time.perf_counter()
        updates = len(roll.ids_masks) // self.gas
        stats = torch.zeros(5, dtype=torch.float64)
        sums: dict = {}
        for epoch in range(self.rl.ppo_epochs):
            for j in range(updates):
                record["lr"] = self._set_lr(update)
                micro = list(range(j * self.gas, (j + 1) * self.gas))
                extra = self.strategy.update(
                    self, roll, micro, update, stats if epoch == 0 else torch.zeros(5, dtype=torch.float64)
                )
                for key, value in extra.items():
                    sums[key] = sums.get(key, 0.0) + value
                update += 1
        record["update_s"] = time.perf_counter() - t0
        all_reduce_sum(stats)
        tokens = max(stats[4].item(), 1.0)
        record.update(
            loss=stats[0].item() / max(1, updates),
            entropy=stats[1].item() / tokens,
            clip_frac=stats[2].item() / tokens,
            grad_norm=step_grad_norm(self.engine, self.cfg.parallel.zero_stage),
        )
        if self.ref_model is not None:
            record["kl"] = stats[3].item() / tokens
        record.update({key: value / self.updates_per_rl_iteration for key, value in sums.items()})
        return record

    def run(self, stop_after: Optional[int] = None, stop: Optional[StopRequest] = None) -> None:
        """Iterate to the end (or to `stop_after`); a stop signal (`stop`, on any rank) ends the excursion
        after the iteration in progress, with a checkpoint of it."""
        end = self.iterations if stop_after is None else min(stop_after, self.iterations)
        every = self.rl.eval.every
        try:
            while self.it < end:
                record = self.iteration(self.it)
                self.it += 1
                stopping = stop_agreed(stop, self.env) and self.it < end
                if every and self.it % every == 0 and self.it < self.iterations:
                    record.update(
                        {
                            f"pass@{r['k']}": r["pass_at_k"]
                            for r in evaluate(
                                self.engine.module,
                                self.tokenizer,
                                self.held_out,
                                self.cfg,
                                self.groups,
                                self.env,
                                perplexity=False,
                            )
                        }
                    )
                last = self.it == end or stopping
                if self.logger.should_log(self.it, last_step=last):
                    self.logger.log(record)
                self.logger.advance()
                path = self.checkpointer.save(self.it, last_step=last)
                if stopping:
                    why = f"{stop.name} received" if stop.signum else "a stop signal on another rank"
                    self.logger.message(
                        f"stopped {self.pipeline} from {self.start.name} at iteration {self.it} "
                        f"({why}); checkpoint {path}; continue with --resume"
                    )
                    break
        finally:
            self.logger.close()
