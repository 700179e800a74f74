"""Ulysses context parallelism (parallel.context) through the real trainer: per-step fp32 losses (and the
validation loss) equal to one process on the same seed and global batch, for MHA (under ZeRO-0), GQA with KV
heads replicated over the context ranks, IHA, and C=2 x DP=2 under ZeRO-2 and ZeRO-3; bad layouts refused in
one line before any process group starts."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_JOB, read_metrics, run_cli

pytestmark = pytest.mark.slow

STEPS = ["train.steps=4", "log.eval_every=4"]
# model.preset=tiny: 4 heads, 2 KV heads (at C=2 each rank receives one KV head)
MODELS = {
    "gqa": [],
    "mha": ["model.kv_heads=4"],
    "gqa_replicated": ["model.kv_heads=1"],  # one KV head, repeated for the two context ranks
    "iha": ["model.attention=iha"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs shared by the tests below, each started at most once: name -> metrics records."""
    root = tmp_path_factory.mktemp("cp")
    done: dict[str, list[dict]] = {}

    def get(name: str, nproc: int, *extra: str) -> list[dict]:
        if name not in done:
            run_dir = root / name
            run_cli(["pretrain", "--nproc-per-node", str(nproc), *TINY_JOB, *STEPS, f"run.dir={run_dir}", *extra])
            done[name] = read_metrics(run_dir)
        return done[name]

    return get


def assert_same_run(single: list[dict], split: list[dict], rtol: float = 1e-5, val: bool = True) -> None:
    a, b = [r["loss"] for r in single], [r["loss"] for r in split]
    assert len(a) == len(b) == 4, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(x), f"step {i + 1}: {x} vs {y}\n{a}\n{b}"
    if val:  # log.eval_batches is per data-parallel rank: the same blocks only at the same data-parallel size
        va, vb = single[-1]["val_loss"], split[-1]["val_loss"]
        assert abs(va - vb) <= rtol * va, (va, vb)


@pytest.mark.parametrize("model", ["mha", "gqa_replicated", "iha"])
def test_context_two_matches_single_process(runs, model):
    """C=2 against one process (ZeRO-1); the MHA run at C=2 uses ZeRO-0, where megatrain takes the gradient
    norm itself and DeepSpeed all-reduces the gradients over the data x context ranks."""
    extra = MODELS[model]
    single = runs(f"single-{model}", 1, "parallel.zero_stage=1", *extra)
    stage = 0 if model == "mha" else 1
    split = runs(f"c2-{model}", 2, "parallel.context=2", f"parallel.zero_stage={stage}", *extra)
    assert_same_run(single, split)


@pytest.mark.parametrize("stage", [2, 3])
def test_context_two_by_data_two_under_zero(runs, stage):
    """4 processes: two context groups of two, each reading its own half of the global batch."""
    single = runs("single-gqa", 1, "parallel.zero_stage=1")
    split = runs(f"c2dp2-zero{stage}", 4, "parallel.context=2", f"parallel.zero_stage={stage}")
    assert_same_run(single, split, val=False)


def test_bad_context_layouts_refused_before_any_process_group(tmp_path):
    cases = [
        (2, ["parallel.context=3"], "parallel.context=3 does not divide model.heads=4"),
        (2, ["parallel.context=2", "data.seq_len=33"], "parallel.context=2 does not divide data.seq_len=33"),
        (2, ["parallel.context=4"], "parallel.tensor x parallel.context = 1 x 4 does not divide the world size 2"),
        (
            4,
            ["parallel.context=2", "parallel.tensor=2", "parallel.sequence=true"],
            "parallel.sequence=true with parallel.context > 1 is not supported",
        ),
        (
            4,
            ["parallel.context=2", "parallel.tensor=2", "model.attention=iha"],
            "model.attention=iha with parallel.context > 1 and parallel.tensor > 1 is not supported",
        ),
    ]
    for nproc, extra, fragment in cases:
        proc = run_cli(
            ["pretrain", "--nproc-per-node", str(nproc), *TINY_JOB, *extra, f"run.dir={tmp_path / 'r'}"],
            check=False,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("megatrain: error")]
        assert len(lines) == 1 and fragment in lines[0], proc.stderr[-3000:]
        assert not (tmp_path / "r").exists()


def test_plan_activations_fall_as_one_over_context():
    from megatrain.config import load_config
    from megatrain.engine.memory_plan import plan_memory

    overrides = ["model.preset=tiny", "model.vocab_size=512", "data.seq_len=32", "train.micro_batch=4"]
    plans = {c: plan_memory(load_config(overrides=[*overrides, f"parallel.context={c}"]), 4) for c in (1, 2, 4)}
    for c in (2, 4):
        assert plans[c].context == c and plans[c].dp == 4 // c
        assert plans[c].activation_bytes * c == plans[1].activation_bytes
        checkpointed = plans[1].activation_bytes_checkpointed
        assert plans[c].activation_bytes_checkpointed * c == pytest.approx(checkpointed, abs=c)
        assert plans[c].optimizer_bytes == plans[1].optimizer_bytes  # ZeRO still shards over all 4 ranks


def test_tensor_two_by_context_two_matches_single_process(runs):
    """4 processes: TP=2 x C=2 (one data replica), ZeRO-1: each context rank attends with heads / 4 = 1 query
    head and the TP rank's KV head. ~30 s."""
    single = runs("single-gqa", 1, "parallel.zero_stage=1")
    split = runs("tp2c2", 4, "parallel.tensor=2", "parallel.context=2", "parallel.zero_stage=1")
    assert_same_run(single, split)


@pytest.mark.parametrize(
    "first,second,stage",
    [
        ((2, 2), (1, 1), 2),  # C=2 -> one process: 2 -> 1 partitions, through the universal checkpoint
        ((1, 1), (2, 2), 1),  # one process -> C=2: 1 -> 2 partitions
        ((2, 2), (1, 2), 2),  # C=2 -> C=1 x DP=2: the same 2 partitions, loaded directly
    ],
    ids=["c2-to-one-process-zero2", "one-process-to-c2-zero1", "c2-to-dp2-zero2"],
)
def test_resume_at_another_context_size_continues_the_run(runs, tmp_path, first, second, stage):
    """A ZeRO-1/2 checkpoint written at (C, processes) = `first` after 2 steps resumes at `second`. When the ZeRO
    partition count (data x context ranks) changes the resume goes through DeepSpeed's universal checkpoint,
    otherwise it loads the partitions as they are; either way steps 3-4 equal the uninterrupted one-process
    run's (rtol 1e-5). ~16 s each."""
    single = runs("single-gqa", 1, "parallel.zero_stage=1")
    (c1, n1), (c2, n2) = first, second
    before, after = tmp_path / "before", tmp_path / "after"
    common = [*TINY_JOB, *STEPS, f"parallel.zero_stage={stage}"]
    run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            str(n1),
            *common,
            f"parallel.context={c1}",
            "train.stop_after=2",
            "checkpoint.every=2",
            f"run.dir={before}",
        ]
    )
    meta = json.loads((before / "checkpoints" / "step_2" / "megatrain.json").read_text())
    assert meta["layout"].get("context", 1) == c1 and meta["layout"]["dp"] == n1
    proc = run_cli(
        [
            "pretrain",
            "--nproc-per-node",
            str(n2),
            *common,
            f"parallel.context={c2}",
            f"run.dir={after}",
            "--resume-from",
            str(before),
        ]
    )
    assert ("resharded" in proc.stdout + proc.stderr) == (n1 != n2)
    a = [r["loss"] for r in single]
    b = [r["loss"] for r in read_metrics(before)] + [r["loss"] for r in read_metrics(after)]
    assert len(b) == 4, b
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-5 * abs(x), f"step {i + 1}: {x} vs {y}\n{a}\n{b}"
