"""A pipeline from outside the package, for tests/rl/test_pipelines.py: `rl.pipeline=toy_pipelines.AnchoredGRPO`
names it by dotted path, as a user names their own (conftest.child_env puts tests/plugins/ on the PYTHONPATH)."""

from megatrain.rl.pipelines import Pipeline, register_pipeline


@register_pipeline("anchored_grpo")
class AnchoredGRPO(Pipeline):
    """One SFT update first, then GRPO whose every micro-batch also pulls towards the reference solutions:
    loss = L_RL + rl.mix_weight * L_SFT. Each update reports `anchored_updates` (1 per update)."""

    def sft_iterations(self, rl) -> int:
        return 1

    def update(self, job, roll, micro, update, stats) -> dict:
        job.sft_batch(update)  # the SFT batch's token count (an all-reduce) before the RL step's collectives
        job.rl_step(roll, micro, update, stats)
        return {"anchored_updates": 1.0}

    def loss(self, job, rl_loss, update, m):
        return rl_loss + job.rl.mix_weight * job.sft_micro_loss(update, m)
