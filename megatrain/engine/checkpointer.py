"""`Checkpointer`: the checkpoint component a training loop holds (pretraining's `Trainer`, an RL excursion).

It decides when to save (`checkpoint.every`, the last step, a stop) and what goes in: the client state and
the checkpoint metadata come from callables of the job, everything else (the commit protocol, the
consolidated weights, the tokenizer copy, pruning to `checkpoint.keep`) is `save_checkpoint`'s. As
torchtitan's CheckpointManager: the loop calls `save(step, last_step=...)` after every step and the
component decides.
"""

from __future__ import annotations

from typing import Callable, Optional

from megatrain.engine.checkpoint import checkpoint_meta, save_checkpoint


class Checkpointer:
    """Saves `engine` into `run_dir/checkpoints/step_N` every `every` steps (0: never) and on the last step.

    state: () -> the client state (what the job needs to continue: its step, data position, ...).
    meta: () -> what the job adds to megatrain.json (checkpoint_meta's `extra`).
    Collective: every rank calls `save` at the same steps.
    """

    def __init__(
        self,
        engine,
        *,
        run_dir: str,
        every: int,
        keep: int,
        env,
        groups,
        model_cfg,
        parallel,
        seq_len: int,
        seed: int,
        tokenizer_path: Optional[str],
        state: Callable[[], dict],
        meta: Callable[[], dict] = dict,
        watchdog=None,
    ):
        self.engine, self.run_dir, self.every, self.keep = engine, run_dir, every, keep
        self.env, self.groups, self.model_cfg, self.parallel = env, groups, model_cfg, parallel
        self.seq_len, self.seed, self.tokenizer_path = seq_len, seed, tokenizer_path
        self.state, self.meta, self.watchdog = state, meta, watchdog

    def should_save(self, step: int, last_step: bool = False) -> bool:
        return last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, *, last_step: bool = False) -> Optional[str]:
        """Save when `should_save(step, last_step)`; returns the checkpoint directory, or None."""
        if not self.should_save(step, last_step):
            return None
        if self.watchdog is not None:
            self.watchdog.phase("checkpoint save", step)
        layout = {
            "world_size": self.env.world_size,
            "dp": self.groups.dp_size,
            "tensor": self.parallel.tensor,
            "zero_stage": self.parallel.zero_stage,
        }
        if getattr(self.parallel, "pipeline", 1) > 1:
            layout["pipeline"] = self.parallel.pipeline
        if getattr(self.parallel, "context", 1) > 1:  # dp above counts data x context ranks (ZeRO's partitions)
            layout["context"] = self.parallel.context
        meta = checkpoint_meta(
            self.model_cfg, layout, seq_len=self.seq_len, seed=self.seed, tokenizer=self.tokenizer_path, **self.meta()
        )
        return save_checkpoint(
            self.engine,
            run_dir=self.run_dir,
            step=step,
            client_state=self.state(),
            meta=meta,
            keep=self.keep,
            rank=self.env.rank,
            tokenizer_path=self.tokenizer_path,
            groups=self.groups,
            model_cfg=self.model_cfg,
        )
