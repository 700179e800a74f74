"""The RL recipe: `megatrain rl` and `launch/rl.py` run `rl(cfg, resume)` in every process.

    RUN/                         run.dir of the RL job
      config.yaml                the resolved config
      pretrain/                  the pretraining run (only when rl.init is null; megatrain's pretrain recipe)
      from_step_N/base_eval.json the start checkpoint's own pass@k / perplexity (pipeline "none")
      from_step_N/PIPELINE/      one sub-run per start checkpoint x pipeline: config.yaml, metrics.jsonl,
                                 tb/, checkpoints/step_I/ (+ latest), eval.json once finished
      eval.jsonl                 one object per checkpoint x pipeline x k
      eval.md, eval.png, tb/     the table, the plot (pass@k vs pretraining step), the same in tensorboard

Composition: the start weights come from `megatrain.load`; each sub-run wraps them in a DeepSpeed
engine (megatrain.engine.deepspeed.initialize, ZeRO / TP from parallel.*) with the optimizer from
optim.* (or `PairAdamW` for parallel averaging); rollouts are `megatrain.generate` on the engine's
module; checkpoints, `latest` and resume are megatrain.engine.checkpoint's; logs go through
MetricsLogger. An iteration: sample rl.group_size completions for each of rl.prompts_per_step
prompts, score them, compute group advantages over the whole (all-gathered) batch, then
rl.ppo_epochs passes of optimizer steps over mini-batches of rl.mini_batch sequences.

Data-parallel layout: the prompts of mini-batch j are split over the DP ranks, each rank generating
and training on its share; losses are normalised by counts over the whole mini-batch, so any
process count computes the same update (up to float summation order).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatrain.config import Config, load_config, save_config
from megatrain.distributed import all_reduce_sum, barrier
from megatrain.engine import checkpoint as ckpt
from megatrain.engine.hf_import import import_hf_llama, is_hf_folder
from megatrain.engine.load import load_for_inference
from megatrain.engine.resilience import StopRequest
from megatrain.engine.trainer import resolve_config
from megatrain.generate import generate, is_truncated
from megatrain.errors import CheckpointError, ConfigError
from megatrain.rl import grpo
from megatrain.rl.config import RL_PIPELINES, pipelines, validate_rl
from megatrain.rl.passk import mean_pass_at_k
from megatrain.rl.rewards import load_reward, score
from megatrain.rl.tasks import Problem, task_splits, write_pretraining_mix

STOP = ["\nQuestion:"]  # the next problem of the prompt format starts: the answer is over
RESULT_FILE = "eval.json"


@dataclasses.dataclass
class Start:
    """A checkpoint an excursion starts from."""
    path: str           # checkpoint directory
    step: int           # its pretraining step
    name: str           # sub-run folder: from_step_N


# ---------------------------------------------------------------------------------------------
# preflight: everything that needs no process group


def _pretrain_config(cfg: Config) -> Config:
    p = cfg.rl.pretrain
    overrides = list(p.overrides) + [f"run.dir={os.path.join(cfg.run.dir, 'pretrain')}"]
    try:
        pre = load_config(p.config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"rl.pretrain.config '{p.config}': {exc}") from None
    if p.task_fraction > 0:
        mix = os.path.join(cfg.run.dir, "pretrain", "arithmetic.jsonl")
        sources = pre.data.source if isinstance(pre.data.source, list) else [pre.data.source]
        pre.data.source = [*sources, mix]
        if pre.data.val_source is None and "embedded" in sources:
            pre.data.val_source = "embedded"
    return pre


def _mix_count(pre: Config, fraction: float, levels) -> int:
    """Problems to mix in so they make about `fraction` of the pretraining characters."""
    from megatrain.data.sources import resolve_sources

    files = [f for f in resolve_sources(pre.data.source[:-1], "data.source")]
    chars = 0
    for f in files:
        size = os.path.getsize(f)
        chars += size * (3 if f.endswith(".gz") else 1)  # gzip'd prose: about 3x smaller
    from megatrain.rl.tasks import arithmetic_problem

    sample = arithmetic_problem(0, 2, 0, list(levels))
    per_problem = len(sample.prompt) + len(sample.solution) + 2
    return max(1, int(fraction / (1 - fraction) * chars / per_problem))


def _pretrain_done(pre: Config) -> bool:
    root = ckpt.checkpoint_root(pre.run.dir)
    tag = ckpt.read_latest(root)
    return tag is not None and ckpt.read_meta(os.path.join(root, tag))["step"] >= pre.train.steps


def _checkpoint_of(path: str, key: str) -> str:
    """A checkpoint directory from a run directory (its latest) or a checkpoint directory."""
    path = ckpt.resolve_checkpoint_dir(os.path.normpath(path))
    if not os.path.isfile(os.path.join(path, ckpt.META_FILE)):
        raise CheckpointError(f"{key}: '{path}' is not a megatrain run or checkpoint directory (no {ckpt.META_FILE})")
    return path


def resolve_starts(rl_cfg, init: str) -> list[Start]:
    """The start checkpoints: rl.init itself, or rl.checkpoints of its run (`all` or a list)."""
    first = _checkpoint_of(init, "rl.init")
    chosen = rl_cfg.checkpoints
    if chosen is None:
        paths = [first]
    else:
        root = os.path.dirname(first)
        available = sorted((int(n[5:]), n) for n in os.listdir(root)
                           if n.startswith("step_") and n[5:].isdigit()
                           and os.path.isfile(os.path.join(root, n, ckpt.META_FILE)))
        if chosen == "all":
            paths = [os.path.join(root, n) for _, n in available]
        else:
            paths = []
            names = {n for _, n in available}
            for item in chosen:
                name = f"step_{item}" if isinstance(item, int) or str(item).isdigit() else str(item)
                if name not in names:
                    raise CheckpointError(f"rl.checkpoints: '{name}' is not a complete checkpoint of '{root}' "
                                          f"(available: {', '.join(n for _, n in available) or 'none'})")
                paths.append(os.path.join(root, name))
    starts = []
    first_meta = ckpt.read_meta(first)
    for path in paths:
        meta = ckpt.read_meta(path)
        if meta["model"] != first_meta["model"] or _tokenizer_sha(path) != _tokenizer_sha(first):
            raise CheckpointError(f"rl.checkpoints: '{path}' holds a different model or tokenizer than '{first}'")
        starts.append(Start(path=path, step=int(meta["step"]), name=f"from_step_{meta['step']}"))
    return starts


def _tokenizer_sha(path: str) -> str:
    import hashlib

    with open(os.path.join(path, "tokenizer.model"), "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _check_start(cfg: Config, start: Start) -> None:
    """A start checkpoint must fit the run: data.tokenizer (when given) and model.* (when set) agree."""
    if cfg.data.tokenizer != "auto":
        if not os.path.isfile(cfg.data.tokenizer):
            raise ConfigError(f"data.tokenizer: file '{cfg.data.tokenizer}' does not exist")
        with open(cfg.data.tokenizer, "rb") as fh:
            import hashlib

            if hashlib.sha256(fh.read()).hexdigest() != _tokenizer_sha(start.path):
                raise CheckpointError(f"checkpoint '{start.path}' was trained with another tokenizer than "
                                      f"data.tokenizer='{cfg.data.tokenizer}'")
    saved = ckpt.read_meta(start.path)["model"]
    defaults = dataclasses.asdict(type(cfg.model)())
    for key, value in dataclasses.asdict(cfg.model).items():
        if key in ckpt.MODEL_KEYS and value != defaults.get(key) and value != saved.get(key):
            raise CheckpointError(f"checkpoint '{start.path}' was written with model.{key}={saved.get(key)!r} but "
                                  f"this run sets model.{key}={value!r}")


def preflight(cfg: Config, resume, world_size: int) -> Optional[Config]:
    """Validate, check the start points and the run directory; returns the pretraining config to
    run first (or None). Raises MegatrainError (one line) before anything is written."""
    validate_rl(cfg, world_size)
    run_dir = cfg.run.dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run.dir '{run_dir}' exists and is not a directory")
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not resume:
        raise CheckpointError(f"run.dir '{run_dir}' already holds an RL run; pass --resume to continue it or choose "
                              f"another run.dir")
    task_splits(cfg.rl.task)                      # a missing, empty or malformed task file
    load_reward(cfg.rl.reward, cfg.rl.format_score)
    pre = None
    if cfg.rl.init is None:
        pre = _pretrain_config(cfg)
        from megatrain.engine.trainer import preflight as pretrain_preflight

        if not (os.path.isdir(pre.run.dir) and _pretrain_done(pre)):
            pretrain_preflight(_with_mix_placeholder(pre), True, world_size)
        init = None
    else:
        init = cfg.rl.init
    if init is not None and is_hf_folder(init):
        _check_hf_init(cfg, init)
    elif init is not None:
        for start in resolve_starts(cfg.rl, init):
            _check_start(cfg, start)
    return pre


def _check_hf_init(cfg: Config, folder: str) -> None:
    """rl.init naming a Hugging Face Llama folder: what megatrain import will refuse, refused now (no tensor read)."""
    from megatrain.engine.load import source_model

    if cfg.rl.checkpoints is not None:
        raise ConfigError(f"rl.checkpoints needs rl.init to be a megatrain run (a series of checkpoints); "
                          f"'{folder}' is a Hugging Face folder")
    _, tokenizer = source_model(folder)
    if tokenizer is None:
        raise CheckpointError(f"rl.init: '{folder}' has no sentencepiece tokenizer.model (megatrain reads "
                              f"sentencepiece tokenizers only; megatrain import --tokenizer can add one)")


def _import_hf_init(cfg: Config, folder: str, env) -> str:
    """rl.init naming a Hugging Face folder: rank 0 imports it into RUN/init once (megatrain import), so the
    excursions start from an ordinary run directory. Returns that directory. Collective."""
    imported = cfg.run.path("init")
    if env.is_main and not os.path.isdir(imported):
        import_hf_llama(folder, imported)
    barrier()
    return imported


def _with_mix_placeholder(pre: Config) -> Config:
    """The pretraining config for its preflight, without the mix file that does not exist yet."""
    if cfg_has_mix(pre):
        probe = copy.deepcopy(pre)
        probe.data.source = pre.data.source[:-1]
        return probe
    return pre


def cfg_has_mix(pre: Config) -> bool:
    return isinstance(pre.data.source, list) and str(pre.data.source[-1]).endswith("arithmetic.jsonl")


# ---------------------------------------------------------------------------------------------
# distributed helpers


def stop_agreed(stop: Optional[StopRequest], env) -> bool:
    """Whether any rank received a stop signal (SIGTERM / SIGUSR1): a one-number all-reduce, so every rank
    stops at the same point. Collective."""
    if stop is None:
        return False
    flag = torch.tensor([1.0 if stop.signum else 0.0], dtype=torch.float64, device=env.device)
    return all_reduce_sum(flag).item() > 0


# ---------------------------------------------------------------------------------------------
# one excursion: start checkpoint x pipeline


class Excursion:
    """RL / SFT / SFT->RL / parallel averaging / loss mixing from one start checkpoint, in `run_dir`."""

    def __init__(self, cfg: Config, env, start: Start, pipeline: str, run_dir: str, problems, groups):
        from megatrain.engine.deepspeed import initialize
        from megatrain.optim import build_optimizer, param_groups
        from megatrain.parallel.parallelize import parallelize
        from megatrain.rl.averaging import PairAdamW

        self.cfg, self.env, self.start, self.pipeline, self.run_dir = cfg, env, start, pipeline, run_dir
        self.rl, self.groups = cfg.rl, groups
        self.dp_size, self.dp_rank = groups.dp_size, groups.dp_rank
        self.train_problems, self.held_out = problems
        self.reward_fn = load_reward(cfg.rl.reward, cfg.rl.format_score)
        model, self.tokenizer, self.model_cfg = load_for_inference(start.path, device=env.device)
        model.train()
        self.ref_model = None
        if self.rl.kl_coef > 0 and pipeline in RL_PIPELINES:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        parallelize(model, groups, sequence_parallel=cfg.parallel.sequence)
        if self.ref_model is not None and groups.tp_size > 1:
            parallelize(self.ref_model, groups, sequence_parallel=cfg.parallel.sequence)

        # DeepSpeed's batch bookkeeping: one optimizer step = rl.mini_batch sequences.
        rollout = self.rl.prompts_per_step * self.rl.group_size
        self.mini = self.rl.mini_batch or rollout
        self.local_mini = self.mini // self.dp_size
        self.micro = min(self.rl.micro_batch, self.local_mini)
        self.gas = self.local_mini // self.micro
        ds_cfg = copy.deepcopy(cfg)
        ds_cfg.train.micro_batch, ds_cfg.train.global_batch, ds_cfg.train.grad_accum = self.micro, self.mini, None
        resolve_config(ds_cfg, env.world_size)
        if pipeline == "parallel_avg":
            o = cfg.optim
            self.optimizer = PairAdamW(param_groups(model, o.weight_decay), lr=cfg.train.lr, betas=(o.beta1, o.beta2),
                                       eps=o.eps)
        else:
            self.optimizer = build_optimizer(cfg.optim, model, cfg.train.lr, on_cuda=env.device.type == "cuda")
        self.engine = initialize(ds_cfg, model, self.optimizer, mpu=groups if cfg.parallel.tensor > 1 else None)
        self.iterations = self.rl.steps + (self.rl.sft_steps if pipeline == "sft_rl" else 0)
        self.updates_per_rl_iteration = self.rl.ppo_epochs * (rollout // self.mini)
        self.total_updates = self._updates_before(self.iterations)
        self.it = 0

        resume_path = ckpt.find_resume_checkpoint(run_dir, True)
        if resume_path is not None:
            meta = ckpt.read_meta(resume_path)
            if meta.get("rl", {}).get("start") != os.path.abspath(start.path) or meta["model"] != dataclasses.asdict(
                    self.model_cfg):
                raise CheckpointError(f"checkpoint '{resume_path}' was written from another start checkpoint or model "
                                      f"({meta.get('rl', {}).get('start')}) than '{start.path}'")
            if ckpt.needs_reshard(meta, resume_path, self.model_cfg, cfg.parallel.zero_stage, self.dp_size,
                                  cfg.parallel.tensor):
                raise CheckpointError(f"checkpoint '{resume_path}' was written at another parallel layout "
                                      f"({meta['layout']}); resume an RL run at the layout it started with")
            state = ckpt.load_checkpoint(self.engine, resume_path, env.rank)
            self.it = int(state["step"])
        if env.is_main:
            os.makedirs(run_dir, exist_ok=True)
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
        from megatrain.engine.metrics import MetricsLogger

        self.logger = MetricsLogger(run_dir, enabled=env.is_main, tensorboard=cfg.log.tensorboard,
                                    progress=cfg.log.progress, total_steps=self.iterations, start_step=self.it)
        if resume_path is not None:
            self.logger.message(f"resumed {pipeline} from {resume_path} at iteration {self.it}")

    # -- schedule ------------------------------------------------------------------------------

    def _is_sft_iteration(self, it: int) -> bool:
        return self.pipeline == "sft" or (self.pipeline == "sft_rl" and it < self.rl.sft_steps)

    def _updates_before(self, it: int) -> int:
        """Optimizer updates (learning-rate schedule steps) taken before iteration `it`."""
        if self.pipeline == "sft":
            return it
        if self.pipeline == "sft_rl":
            sft = min(it, self.rl.sft_steps)
            return sft + max(0, it - sft) * self.updates_per_rl_iteration
        return it * self.updates_per_rl_iteration

    def _set_lr(self, update: int) -> float:
        from megatrain.optim.schedules import lr_at

        t = self.cfg.train
        lr = lr_at(update, lr=t.lr, steps=max(1, self.total_updates), warmup_steps=t.warmup_steps,
                   min_lr_ratio=t.min_lr_ratio, schedule=t.schedule)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # -- data ----------------------------------------------------------------------------------

    def _order(self, epoch: int, count: int) -> list[int]:
        g = torch.Generator().manual_seed(self.rl.seed * 1_000_003 + epoch)
        return torch.randperm(count, generator=g).tolist()

    def _stream(self, start: int, count: int) -> list[int]:
        """Indices start..start+count-1 of the training problems, reshuffled each pass."""
        n = len(self.train_problems)
        return [self._order(i // n, n)[i % n] for i in range(start, start + count)]

    def _local_prompts(self) -> list[int]:
        """Positions (in the iteration's global prompt list) this rank generates and trains on:
        mini-batch j's prompts split evenly over the DP ranks."""
        per_mini = self.mini // self.rl.group_size
        share = per_mini // self.dp_size
        out = []
        for j in range(self.rl.prompts_per_step // per_mini):
            base = j * per_mini + self.dp_rank * share
            out.extend(range(base, base + share))
        return out

    # -- forward pieces ------------------------------------------------------------------------

    def _sequences(self, prompts: list[list[int]], completions: list[list[int]]):
        """Right-padded ids [B, L] and the completion mask over next-token targets [B, L-1]."""
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width - 1)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            mask[i, len(p) - 1:len(p) + len(c) - 1] = 1.0
        dev = self.env.device
        return ids.to(dev), mask.to(dev)

    def _logprobs(self, module, ids: torch.Tensor):
        logits = module(ids)
        return grpo.token_logprobs(logits[:, :-1], ids[:, 1:])

    # -- rollout -------------------------------------------------------------------------------

    def _rollout(self, it: int) -> dict:
        rl, G = self.rl, self.rl.group_size
        timings = {}
        t0 = time.perf_counter()
        global_ids = self._stream(self._rl_iteration(it) * rl.prompts_per_step, rl.prompts_per_step)
        local = self._local_prompts()
        problems = [self.train_problems[global_ids[pos]] for pos in local]
        prompt_ids = [self.tokenizer.encode(p.prompt) for p in problems]
        rows = [ids for ids in prompt_ids for _ in range(G)]
        seeds = [(rl.seed * 1_000_003 + it) * 100_003 + pos * G + s for pos in local for s in range(G)]
        self.engine.module.eval()
        completions = generate(self.engine.module, rows, max_new_tokens=rl.max_new_tokens,
                                         temperature=rl.temperature, top_p=rl.top_p, stop=STOP,
                                         eos_id=self.tokenizer.eos_id, seed=seeds, tokenizer=self.tokenizer)
        self.engine.module.train()
        timings["generate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        local_rewards = torch.tensor([
            score(self.reward_fn, problems[i // G].prompt, self._text(c), problems[i // G].answer, rl.reward)
            for i, c in enumerate(completions)], dtype=torch.float64).view(len(local), G)
        timings["reward_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        seq_prompts = [prompt_ids[i // G] for i in range(len(rows))]
        ids_masks = [self._sequences(seq_prompts[s:s + self.micro], completions[s:s + self.micro])
                     for s in range(0, len(rows), self.micro)]
        old_logp, kl_seq = [], []
        with torch.no_grad():
            for ids, mask in ids_masks:
                logp, _ = self._logprobs(self.engine.module, ids)
                old_logp.append(logp)
                if self.ref_model is not None:
                    ref, _ = self._logprobs(self.ref_model, ids)
                    kl = grpo.kl_estimate(logp, ref, rl.kl_estimator)
                    kl_seq.append((kl * mask).sum(dim=1))
        # Global rewards [P, G] in prompt order, identical on every rank, for the advantages.
        rewards_all = self._gather_rows(local_rewards, local)
        shaped = local_rewards.clone()
        if self.ref_model is not None and rl.kl_in == "reward":
            shaped = shaped - rl.kl_coef * torch.cat(kl_seq).double().view(len(local), G).cpu()
        shaped_all = self._gather_rows(shaped, local)
        advantages = grpo.group_advantages(shaped_all, scale=rl.scale_rewards)
        flat = (shaped_all.amax(dim=1) == shaped_all.amin(dim=1))
        local_adv = advantages[local].reshape(-1)
        truncated = torch.tensor([is_truncated(c, rl.max_new_tokens, stop=STOP, eos_id=self.tokenizer.eos_id,
                                               tokenizer=self.tokenizer) for c in completions], dtype=torch.bool)
        keep = grpo.sequence_weights(flat[local], truncated, G, dynamic_filter=rl.dynamic_filter,
                                     mask_truncated=rl.mask_truncated)
        lengths = torch.tensor([float(len(c)) for c in completions], dtype=torch.float64)
        stats = torch.tensor([lengths.sum().item(), float(len(rows)), truncated.double().sum().item()],
                             dtype=torch.float64)
        all_reduce_sum(stats)
        timings["logprob_s"] = time.perf_counter() - t0
        return dict(ids_masks=ids_masks, old_logp=old_logp, advantages=local_adv, keep=keep, timings=timings,
                    reward_mean=rewards_all.mean().item(), reward_std=rewards_all.std().item(),
                    solved=(rewards_all >= 1.0).double().mean().item(), response_length=(stats[0] / stats[1]).item(),
                    truncated=(stats[2] / stats[1]).item(), filtered_groups=flat.double().mean().item())

    def _text(self, completion: list[int]) -> str:
        tokens = [t for t in completion if t != self.tokenizer.eos_id]
        return self.tokenizer.decode(tokens)

    def _gather_rows(self, local_rows: torch.Tensor, local: list[int]) -> torch.Tensor:
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

    def _rl_iteration(self, it: int) -> int:
        return it - self.rl.sft_steps if self.pipeline == "sft_rl" else it

    # -- losses --------------------------------------------------------------------------------

    def _scale(self) -> float:
        # DeepSpeed divides each micro-batch's loss by gradient_accumulation_steps and averages
        # gradients over DP ranks; the losses here are already normalised over the whole mini-batch.
        return float(self.gas * self.dp_size)

    def _rl_minibatch(self, roll: dict, micro_indices: list[int], update: int, stats: torch.Tensor) -> None:
        """backward of the RL loss over this rank's micro-batches `micro_indices` (one optimizer step)."""
        rl = self.rl
        masks = []
        for m in micro_indices:
            ids, mask = roll["ids_masks"][m]
            keep = roll["keep"][m * self.micro:(m + 1) * self.micro].to(mask)
            masks.append(mask * keep[:, None])
        norm = torch.tensor([sum(grpo.loss_normalizer(mk, rl.loss_agg) for mk in masks)], dtype=torch.float64)
        all_reduce_sum(norm)
        normalizer = max(norm.item(), 1.0)
        for m, mask in zip(micro_indices, masks):
            ids, _ = roll["ids_masks"][m]
            adv = roll["advantages"][m * self.micro:(m + 1) * self.micro].to(ids.device, torch.float32)
            logp, entropy = self._logprobs(self.engine, ids)
            pg, clipped = grpo.clipped_objective(logp, roll["old_logp"][m], adv, clip_low=rl.clip_low,
                                                 clip_high=rl.clip_high, dual_clip=rl.dual_clip)
            per_token = pg
            kl = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref, _ = self._logprobs(self.ref_model, ids)
                kl = grpo.kl_estimate(logp, ref, rl.kl_estimator)
                if rl.kl_in == "loss":
                    per_token = pg + rl.kl_coef * kl
            loss = grpo.aggregate(per_token, mask, rl.loss_agg, normalizer)
            if self.pipeline == "loss_mix":
                loss = rl.mix_weight * loss + (1 - rl.mix_weight) * self._sft_micro_loss(update, m)
            self.engine.backward(loss * self._scale())
            with torch.no_grad():
                tokens = mask.sum()
                stats += torch.stack([
                    loss.detach().double(), (entropy * mask).sum().double(), (clipped * mask).sum().double(),
                    (kl * mask).sum().double() if kl is not None else torch.zeros((), dtype=torch.float64),
                    tokens.double()]).cpu()
            self.engine.step()

    def _sft_batch(self, update: int):
        """This rank's SFT micro-batches for SFT update number `update` (rl.mini_batch problems)."""
        if getattr(self, "_sft_cache", (None,))[0] != update:
            indices = self._stream(update * self.mini, self.mini)[self.dp_rank * self.local_mini:
                                                                   (self.dp_rank + 1) * self.local_mini]
            probs = [self.train_problems[i] for i in indices]
            prompts = [self.tokenizer.encode(p.prompt) for p in probs]
            targets = [self.tokenizer.encode(" " + p.solution) + [self.tokenizer.eos_id] for p in probs]
            micro = [self._sequences(prompts[s:s + self.micro], targets[s:s + self.micro])
                     for s in range(0, len(probs), self.micro)]
            tokens = torch.tensor([sum(float(mk.sum()) for _, mk in micro)], dtype=torch.float64)
            all_reduce_sum(tokens)
            self._sft_cache = (update, micro, max(tokens.item(), 1.0))
        return self._sft_cache[1], self._sft_cache[2]

    def _sft_micro_loss(self, update: int, m: int) -> torch.Tensor:
        """Token-mean NLL of the reference solutions (answer tokens only), normalised over the mini-batch."""
        micro, tokens = self._sft_batch(update)
        ids, mask = micro[m]
        logp, _ = self._logprobs(self.engine, ids)
        return grpo.aggregate(-logp, mask, "token-mean", tokens)

    def _sft_update(self, update: int) -> float:
        total = torch.zeros(1, dtype=torch.float64)
        for m in range(self.gas):
            loss = self._sft_micro_loss(update, m)
            self.engine.backward(loss * self._scale())
            total += loss.detach().double().cpu()
            self.engine.step()
        return all_reduce_sum(total).item()

    def _sft_updates_done(self, it: int) -> int:
        """SFT updates taken before iteration `it` (each parallel_avg / loss_mix RL update pairs with one)."""
        if self.pipeline in ("sft", "sft_rl"):
            return min(it, self.rl.sft_steps) if self.pipeline == "sft_rl" else it
        return it * self.updates_per_rl_iteration

    # -- iteration -----------------------------------------------------------------------------

    def iteration(self, it: int) -> dict:
        record: dict = {"step": it + 1}
        update = self._updates_before(it)
        if self._is_sft_iteration(it):
            record["lr"] = self._set_lr(update)
            t0 = time.perf_counter()
            record["sft_loss"] = self._sft_update(self._sft_updates_done(it))
            record["update_s"] = time.perf_counter() - t0
            record["loss"] = record["sft_loss"]
            record["grad_norm"] = self._grad_norm()
            return record
        roll = self._rollout(it)
        record.update({k: roll[k] for k in ("reward_mean", "reward_std", "solved", "response_length",
                                            "truncated", "filtered_groups")})
        record.update(roll["timings"])
        t0 = time.perf_counter()
        n_micro = len(roll["ids_masks"])
        stats = torch.zeros(5, dtype=torch.float64)
        sft_loss, sft_update = 0.0, self._sft_updates_done(it)
        for epoch in range(self.rl.ppo_epochs):
            for j in range(n_micro // self.gas):
                record["lr"] = self._set_lr(update)
                micro_indices = list(range(j * self.gas, (j + 1) * self.gas))
                if self.pipeline == "loss_mix":
                    self._sft_batch(sft_update)  # its normalizer all-reduce happens before the RL backward
                if self.pipeline == "parallel_avg":
                    self.optimizer.phase = "a"  # the RL update is computed and held
                self._rl_minibatch(roll, micro_indices, sft_update, stats if epoch == 0 else torch.zeros(5, dtype=torch.float64))
                if self.pipeline == "parallel_avg":
                    self.optimizer.phase = "b"  # the SFT update, then θ <- θ + (Δ_RL + Δ_SFT) / 2
                    sft_loss += self._sft_update(sft_update)
                update += 1
                sft_update += 1
        record["update_s"] = time.perf_counter() - t0
        all_reduce_sum(stats)
        tokens = max(stats[4].item(), 1.0)
        record.update(loss=stats[0].item() / max(1, n_micro // self.gas), entropy=stats[1].item() / tokens,
                      clip_frac=stats[2].item() / tokens, grad_norm=self._grad_norm())
        if self.ref_model is not None:
            record["kl"] = stats[3].item() / tokens
        if self.pipeline == "parallel_avg":
            record["sft_loss"] = sft_loss / self.updates_per_rl_iteration
        return record

    def _grad_norm(self) -> Optional[float]:
        if self.cfg.parallel.zero_stage == 0:
            return None
        norm = self.engine.get_global_grad_norm()
        return norm.item() if isinstance(norm, torch.Tensor) else norm

    def save(self) -> str:
        cfg = self.cfg
        meta = {"model": dataclasses.asdict(self.model_cfg),
                "layout": {"world_size": self.env.world_size, "dp": self.dp_size, "tensor": cfg.parallel.tensor,
                           "zero_stage": cfg.parallel.zero_stage},
                "seq_len": cfg.data.seq_len, "seed": cfg.rl.seed, "tokenizer": self.tokenizer.path,
                "rl": {"start": os.path.abspath(self.start.path), "start_step": self.start.step,
                       "pipeline": self.pipeline}}
        return ckpt.save_checkpoint(self.engine, run_dir=self.run_dir, step=self.it, client_state={"step": self.it},
                                    meta=meta, keep=cfg.checkpoint.keep, rank=self.env.rank,
                                    tokenizer_path=self.tokenizer.path, groups=self.groups, model_cfg=self.model_cfg)

    def run(self, stop_after: Optional[int] = None, stop: Optional[StopRequest] = None) -> None:
        """Iterate to the end (or to `stop_after`); a stop signal (`stop`, on any rank) ends the excursion
        after the iteration in progress, with a checkpoint of it."""
        cfg = self.cfg
        end = self.iterations if stop_after is None else min(stop_after, self.iterations)
        try:
            while self.it < end:
                record = self.iteration(self.it)
                self.it += 1
                stopping = stop_agreed(stop, self.env) and self.it < end
                if self.rl.eval.every and self.it % self.rl.eval.every == 0 and self.it < self.iterations:
                    record.update({f"pass@{r['k']}": r["pass_at_k"] for r in
                                   evaluate(self.engine.module, self.tokenizer, self.held_out, cfg, self.groups,
                                            self.env, perplexity=False)})
                if self.it % cfg.log.every == 0 or self.it == end or stopping:
                    self.logger.log(record)
                    if self.logger.tb is not None:
                        for key, value in record.items():
                            if key not in ("step", "loss", "lr", "grad_norm") and isinstance(value, float):
                                self.logger.tb.add_scalar(f"rl/{key}", value, record["step"])
                self.logger.advance()
                if self.it == end or stopping or (cfg.checkpoint.every and self.it % cfg.checkpoint.every == 0):
                    path = self.save()
                if stopping:
                    why = f"{stop.name} received" if stop.signum else "a stop signal on another rank"
                    self.logger.message(f"stopped {self.pipeline} from {self.start.name} at iteration {self.it} "
                                        f"({why}); checkpoint {path}; continue with --resume")
                    break
        finally:
            self.logger.close()


# ---------------------------------------------------------------------------------------------
# evaluation: pass@k on held-out problems, perplexity on the pretraining corpus


def evaluate(model, tokenizer, held_out: list[Problem], cfg: Config, groups, env, perplexity: bool = True) -> list[dict]:
    """pass@k for every k of rl.eval.k (rows), each with mean_reward and (with `perplexity`) val_loss /
    val_ppl. The problems are split over DP ranks; every sample has a fixed seed, so two models are
    compared on the same random numbers."""

    e, rl = cfg.rl.eval, cfg.rl
    reward_fn = load_reward(rl.reward, rl.format_score)
    count = e.problems or len(held_out)
    mine = list(range(groups.dp_rank, count, groups.dp_size))
    rows = [tokenizer.encode(held_out[i].prompt) for i in mine for _ in range(e.samples)]
    seeds = [(rl.seed + 7) * 1_000_003 + i * e.samples + s for i in mine for s in range(e.samples)]
    was_training = model.training
    model.eval()
    completions = generate(model, rows, max_new_tokens=rl.max_new_tokens, temperature=e.temperature,
                                     stop=STOP, eos_id=tokenizer.eos_id, seed=seeds, tokenizer=tokenizer) if rows else []
    correct = torch.zeros(count, dtype=torch.float64)
    reward_sum = torch.zeros(1, dtype=torch.float64)
    for n, completion in enumerate(completions):
        p = held_out[mine[n // e.samples]]
        text = tokenizer.decode([t for t in completion if t != tokenizer.eos_id])
        r = score(reward_fn, p.prompt, text, p.answer, rl.reward)
        reward_sum += r
        correct[mine[n // e.samples]] += float(r >= 1.0)
    if groups.dp_size > 1:
        both = torch.cat([correct, reward_sum]).to(env.device)
        dist.all_reduce(both, group=groups.dp_group)
        correct, reward_sum = both[:count].cpu(), both[count:].cpu()
    out = {"mean_reward": reward_sum.item() / (count * e.samples), "n": e.samples, "problems": count}
    if perplexity:
        out.update(_perplexity(model, tokenizer, cfg, groups, env))
    model.train(was_training)
    return [{"k": k, "pass_at_k": mean_pass_at_k(correct.long().tolist(), e.samples, k), **out} for k in e.k]


@torch.no_grad()
def _perplexity(model, tokenizer, cfg: Config, groups, env) -> dict:
    """Validation loss / perplexity on data.val_source (default: the held-out novel of the embedded
    corpus), log.eval_batches micro-batches of data.seq_len tokens per DP rank."""
    from megatrain.data.sampler import PackedBlocks, val_batches
    from megatrain.data.sources import cache_dir, resolve_sources
    from megatrain.data.token_cache import build_token_cache, open_token_cache

    d = cfg.data
    files = resolve_sources(d.val_source if d.val_source is not None else "embedded", "data.val_source")
    root = cache_dir(d)
    if env.local_rank == 0:
        build_token_cache(files, tokenizer, root, d.text_field)
    barrier()
    blocks = PackedBlocks(open_token_cache(files, tokenizer, root, d.text_field, "data.val_source"),
                          min(d.seq_len, model.config.max_seq_len))
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for indices in val_batches(blocks, cfg.rl.micro_batch, groups.dp_rank, groups.dp_size, cfg.log.eval_batches):
        inputs, labels = blocks.batch(indices)
        total[0] += model(inputs.to(env.device), labels=labels.to(env.device)).double()
        total[1] += 1
    if groups.dp_size > 1:
        dist.all_reduce(total, group=groups.dp_group)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


# ---------------------------------------------------------------------------------------------
# the job


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def rl(cfg: Config, resume=False, stop_after: Optional[int] = None) -> list[dict]:
    """Run (or resume) the RL job in this process; returns the rows of RUN/eval.jsonl.

    `stop_after` (tests, preemptible jobs): stop every excursion after that many iterations, with a
    checkpoint, without writing results. SIGTERM / SIGUSR1 to any rank does the same at the next
    iteration (or before the next excursion; the pretraining stage stops as `megatrain pretrain` does),
    and the job returns [] so the command exits 0; `--resume` continues.
    """
    from megatrain.engine.deepspeed import init_distributed
    from megatrain.env import world_size

    world = world_size()
    pre = preflight(cfg, resume, world)
    env = init_distributed(cfg)
    stop = StopRequest()
    try:
        stop.install()  # SIGTERM / SIGUSR1: stop at the next iteration (or before the next excursion)
    except ValueError:
        stop = None  # not the main thread (an embedding application): it handles signals itself
    try:
        return _rl_stages(cfg, env, pre, stop, stop_after)
    finally:
        if stop is not None:
            stop.restore()


def _rl_stages(cfg: Config, env, pre: Optional[Config], stop: Optional[StopRequest],
               stop_after: Optional[int]) -> list[dict]:
    """rl()'s stages in order: pretraining (rl.init null), each start's base evaluation, each excursion,
    the results. Returns [] when it stopped early (stop_after, or a stop signal)."""
    from megatrain.parallel.groups import build_groups

    run_dir = cfg.run.dir
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    init = cfg.rl.init
    if pre is not None:
        if not (os.path.isdir(pre.run.dir) and _pretrain_done(pre)):
            from megatrain.engine.trainer import pretrain

            if cfg_has_mix(pre) and env.local_rank == 0 and not os.path.isfile(pre.data.source[-1]):
                write_pretraining_mix(pre.data.source[-1], cfg.rl.task.seed, _mix_count(
                    pre, cfg.rl.pretrain.task_fraction, cfg.rl.task.levels), list(cfg.rl.task.levels))
            barrier()
            pretrain(pre, resume=True)  # its own stop handling: a signal checkpoints and returns
            barrier()
            if not _pretrain_done(pre):
                return []  # stopped on a signal; the trainer said where
        init = pre.run.dir
    elif is_hf_folder(init):
        init = _import_hf_init(cfg, init, env)
    starts = resolve_starts(cfg.rl, init)
    for start in starts:
        _check_start(cfg, start)
    groups = build_groups(cfg.parallel.tensor)
    problems = task_splits(cfg.rl.task)
    rows: list[dict] = []
    for start in starts:
        folder = cfg.run.path(start.name)
        base_file = os.path.join(folder, "base_eval.json")
        if os.path.isfile(base_file):
            base = _read_json(base_file)
        else:
            model, tokenizer, _ = load_for_inference(start.path, device=env.device)
            base = evaluate(model, tokenizer, problems[1], cfg, groups, env)
            del model
            if env.is_main:
                os.makedirs(folder, exist_ok=True)
                _write_json(base_file, base)
        rows += [{"checkpoint": os.path.basename(start.path), "pretrain_step": start.step, "pipeline": "none",
                  **r} for r in base]
        for pipeline in pipelines(cfg.rl):
            sub = cfg.run.path(start.name, pipeline)
            result = os.path.join(sub, RESULT_FILE)
            if os.path.isfile(result):
                found = _read_json(result)
            else:
                if stop_agreed(stop, env):
                    if env.is_main:
                        print(f"stopped before {pipeline} from {start.name} ({stop.name or 'a stop signal'}); the "
                              f"finished parts are kept; continue with --resume", flush=True)
                    return []
                job = Excursion(cfg, env, start, pipeline, sub, problems, groups)
                job.run(stop_after, stop)
                if job.it < job.iterations:
                    return []
                found = evaluate(job.engine.module, job.tokenizer, problems[1], cfg, groups, env)
                if env.is_main:
                    _write_json(result, found)
                del job
            rows += [{"checkpoint": os.path.basename(start.path), "pretrain_step": start.step,
                      "pipeline": pipeline, **r} for r in found]
            barrier()
    if env.is_main:
        from megatrain.rl.study import write_results

        write_results(run_dir, rows, tensorboard=cfg.log.tensorboard)
    barrier()
    return rows

