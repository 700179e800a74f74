"""The one module that reaches into DeepSpeed's internals. Tested with deepspeed>=0.16,<0.20.

Everything else in megatrain talks to DeepSpeed through its public surface: `deepspeed.initialize` /
`init_distributed`, the engine's forward / backward / step / save_checkpoint / load_checkpoint /
get_global_grad_norm / gradient_clipping, `engine.optimizer.param_groups`, the client optimizer it
is handed (DeepSpeed ends every ZeRO stage in that optimizer's `step()`, which is how a non-finite
loss skips an update: megatrain.optim.skippable), and the `safe_*` fragment API of deepspeed.utils.
(Resharding, megatrain.engine.reshard, drives DeepSpeed's universal-checkpoint converter and
reads the folders it writes: a file format, not live objects.) Two features need more than that,
and this module is where they get it.

GaLore / Fira under ZeRO 1/2 (megatrain.optim.zero_bridge, `extend_zero_step`). The projected
weights stay out of the optimizer ZeRO flattens, yet must share ZeRO's gradient norm, clip
coefficient and skip decision. ZeRO's optimizer is not a torch Optimizer and offers no hook inside
its step, so this module replaces two methods on the *instance* DeepSpeed built:

- `DeepSpeedZeroOptimizer.scaled_global_norm(norm_type)`: the loss-scaled norm ZeRO clips with,
  checks for overflow and reports; the projected weights' squared norm is added to it;
- `DeepSpeedZeroOptimizer.step(closure)`: wrapped, to reduce the projected gradients before it and
  step the projected optimizer after it;

and reads the instance attributes `loss_scale` (a property; 1 for bf16 / fp32), `overflow` (set
by step when it dropped the update), `_global_grad_norm` (the unscaled norm step computed) and
`clip_grad` (the threshold it clipped with: restored from a checkpoint on resume).
Invalid norms are DeepSpeed's convention -1, kept invalid.

ReLoRA restarts (megatrain.optim.relora). The public `safe_get/set_full_fp32_param` and
`safe_get/set_full_optimizer_state` read and write the fp32 masters and Adam moments, but cannot say
whether a parameter has moments yet, and DeepSpeed links the moments to the parameters only lazily
after its first step (not after a resumed run's load_state_dict). For those, this module uses:

- the parameter attributes `_hp_mapping` (set on every parameter of a ZeRO 1/2 or bf16 optimizer
  group; None where this rank holds no fragment), `_hp_mapping.optim_fragment` (the linked Adam
  state) and `_dp_group`;
- `deepspeed.utils.lazy_init_hp_params_optimizer_state` (exported, undocumented) with the
  optimizer's flat groups: `bit16_groups` / `single_partition_of_fp32_groups` (ZeRO 1/2),
  `bf16_groups` / `fp32_groups_flat_partition` (bf16 at stage 0), and `.optimizer` (the client).

The lean ZeRO 1/2 step (`lean_zero_step`, applied to every run's ZeRO 1/2 optimizer by
megatrain.engine.deepspeed). DeepSpeed's step spends a handful of small ops per parameter tensor
outside the optimizer's own math: in bf16 it first scans every gradient for inf/NaN (amax, amin,
isfinite, logical ops, an all-reduce and a host read), then takes each gradient's norm on an fp64
copy of it. Both are replaced on the instance, keeping DeepSpeed's rules and results:

- `DeepSpeedZeroOptimizer.get_grad_norm_direct(gradients, params, norm_type)`: the L2 norm from one
  `torch._foreach_norm` in fp64 (no fp64 copy of the gradients; equal to DeepSpeed's per-tensor
  norms bit for bit on a CPU), over the same gradients (tensor-parallel slices on their own rank,
  the rest on TP rank 0, pipeline-replicated ones skipped), the same sums over the data- and
  model-parallel groups and the same -1 for a non-finite result; any other norm type goes to
  DeepSpeed's own;
- in bf16, the per-gradient scan is turned off in the config (`bf16.check_grad_overflow: false`,
  `lean_bf16_config`) and `scaled_global_norm` is wrapped to drop the step when the global norm is
  not finite: the rule DeepSpeed applies to fp32 and fp16 ZeRO 1/2 and to bf16 ZeRO-3, since a
  non-finite gradient anywhere makes the all-reduced norm non-finite on every rank;
- `DeepSpeedZeroOptimizer.unscale_and_clip_grads(grad_groups_flat, total_norm)`: the same clip factor
  (an invalid norm clips as inf) computed on the device, without DeepSpeed's host read per group;
- `drop_step_on_device(optimizer, flag)`: the trainer's skip decision (a non-finite loss anywhere, a
  loss spike) as a 0-dim bool tensor, folded into the global norm as DeepSpeed's invalid norm -1, so the
  one host read that decides the skip (the norm check above, or DeepSpeed's own in fp32) decides it too.
  `step` is wrapped to forget the flag after each step. Offered for fp32 and bf16 steps that compute
  the norm and act on an invalid one (`megatrain_device_drop`); an fp16 loss scale would shrink on it.

Without ZeRO, DeepSpeed runs bf16 through its `FP16_UnfusedOptimizer` (fp32 master per tensor), whose step
reads the device once per gradient tensor (an inf/NaN check each) and twice per group (the norm):
`lean_stage0_step` replaces that `step` on the instance with the same rules, one fp64 multi-tensor norm and
one host read (taking `drop_step_on_device`'s flag too), for bf16 with the static loss scale 1 only. It
reads `fp16_groups`, `fp32_groups`, `optimizer`, `clip_grad`, `loss_scale_config`, `low_precision_dtype`,
`fused_lamb_legacy`, `mpu` and calls `zero_grad` and `_update_scale`.

ZeRO-3's step reads its combined gradient norm once anyway: `lean_zero3_step` wraps its `_get_norm_groups`
(and `step`) on the instance so that the flag makes the first group's norm NaN, for fp32 and bf16 without
optimizer offload.

The ZeRO 1/2 step reads the instance attributes `dp_process_group`, `model_parallel_rank`, `device`, `dtype`,
`clip_grad`, `loss_scale`, the methods `_model_parallel_all_reduce`, `unscale_and_clip_grads` and
`step`, and, where present, `check_grad_overflow`, `compute_grad_norm` and `dynamic_loss_scale`. A
DeepSpeed without the required ones keeps its own step (a log line says so).

`check_deepspeed_internals()` verifies at start-up (megatrain.engine.deepspeed) that the installed
DeepSpeed still has every class-level piece a run's features need; the instance attributes are
checked where the instances are handed in. Either failure is one line naming what moved and the
tested versions (TESTED_DEEPSPEED, the same range as pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from megatrain.errors import MegatrainError

log = logging.getLogger(__name__)

__all__ = [
    "TESTED_DEEPSPEED",
    "ZERO_STEP",
    "RELORA",
    "DeepSpeedInternalsError",
    "check_deepspeed_internals",
    "is_zero_1_2_optimizer",
    "extend_zero_step",
    "keeps_fp32_master",
    "optimizer_state_linked",
    "relink_optimizer_state",
    "client_optimizer",
    "PIPELINE",
    "before_pipeline_step",
    "lean_bf16_config",
    "lean_zero_step",
    "lean_stage0_step",
    "lean_zero3_step",
    "drop_step_on_device",
]

# Keep equal to the deepspeed requirement in pyproject.toml (tests/optim/test_deepspeed_adapter.py checks).
TESTED_DEEPSPEED = ">=0.16,<0.20"

# Features that need internals, as the config that turns them on.
ZERO_STEP = "optim.name=galore/fira under parallel.zero_stage 1 or 2"
RELORA = "model.linear=relora"
PIPELINE = "parallel.pipeline > 1"

_ZERO_MODULE = "deepspeed.runtime.zero.stage_1_and_2"

# feature -> [(module, attribute path)] that must exist on the installed DeepSpeed (class level).
_REQUIRED = {
    ZERO_STEP: [
        (_ZERO_MODULE, "DeepSpeedZeroOptimizer.step"),
        (_ZERO_MODULE, "DeepSpeedZeroOptimizer.scaled_global_norm"),
        (_ZERO_MODULE, "DeepSpeedZeroOptimizer.loss_scale"),
    ],
    RELORA: [
        ("deepspeed.utils", "lazy_init_hp_params_optimizer_state"),
        ("deepspeed.utils", "safe_get_full_fp32_param"),
        ("deepspeed.utils", "safe_set_full_fp32_param"),
        ("deepspeed.utils", "safe_get_full_optimizer_state"),
        ("deepspeed.utils", "safe_set_full_optimizer_state"),
        ("deepspeed.utils.tensor_fragment", "tensor_fragment.optim_fragment"),
    ],
    PIPELINE: [
        ("deepspeed.runtime.pipe.engine", "PipelineEngine._INSTRUCTION_MAP"),
        ("deepspeed.runtime.pipe.engine", "PipelineEngine._exec_optimizer_step"),
        ("deepspeed.runtime.pipe.schedule", "OptimizerStep"),
    ],
}
# Instance attributes of the ZeRO 1/2 optimizer that extend_zero_step reads or replaces.
_ZERO_INSTANCE = ("step", "scaled_global_norm", "loss_scale", "overflow", "_global_grad_norm", "clip_grad")
# (low-precision groups, flat fp32 partitions) of DeepSpeed's ZeRO 1/2 and bf16 stage-0 optimizers.
_FLAT_GROUPS = (("bit16_groups", "single_partition_of_fp32_groups"), ("bf16_groups", "fp32_groups_flat_partition"))


class DeepSpeedInternalsError(MegatrainError):
    """The installed DeepSpeed lacks an internal megatrain relies on (see this module's docstring)."""


def _version() -> str:
    import deepspeed

    return getattr(deepspeed, "__version__", "unknown")


def _missing(what: str, feature: str) -> DeepSpeedInternalsError:
    return DeepSpeedInternalsError(
        f"DeepSpeed {_version()} has no {what}, which megatrain uses for {feature} "
        f"(megatrain.optim.deepspeed_adapter is tested with deepspeed{TESTED_DEEPSPEED}; "
        f"install one of those: pip install 'deepspeed{TESTED_DEEPSPEED}')"
    )


def _has_member(owner, name: str) -> bool:
    if dataclasses.is_dataclass(owner) and isinstance(owner, type):
        if name in {f.name for f in dataclasses.fields(owner)}:
            return True
    return hasattr(owner, name)


def _check(module_name: str, path: str, feature: str) -> None:
    try:
        owner = importlib.import_module(module_name)
    except ImportError:
        raise _missing(f"module {module_name}", feature) from None
    for name in path.split("."):
        if not _has_member(owner, name):
            raise _missing(f"{module_name}.{path}", feature)
        owner = getattr(owner, name, None)


def _in_tested_range(version: str) -> Optional[bool]:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging comes with DeepSpeed; without it, skip the advisory check
        return None
    try:
        return Version(version) in SpecifierSet(TESTED_DEEPSPEED)
    except InvalidVersion:
        return None


def check_deepspeed_internals(features: Iterable[str] = (ZERO_STEP, RELORA)) -> None:
    """Raise DeepSpeedInternalsError (one line) if the installed DeepSpeed lacks an internal that
    `features` (ZERO_STEP, RELORA) need. A version outside TESTED_DEEPSPEED that has them all only
    logs a warning. No features: nothing to check (and DeepSpeed is not imported)."""
    features = list(features)
    if not features:
        return
    for feature in features:
        if feature not in _REQUIRED:
            raise ValueError(f"unknown feature {feature!r} (known: {', '.join(_REQUIRED)})")
        for module_name, path in _REQUIRED[feature]:
            _check(module_name, path, feature)
    version = _version()
    if _in_tested_range(version) is False:
        log.warning(
            "DeepSpeed %s is outside the versions megatrain is tested with (deepspeed%s); the internals "
            "it relies on are present, but their behaviour is not verified",
            version,
            TESTED_DEEPSPEED,
        )


def _require(obj, names: Iterable[str], feature: str) -> None:
    for name in names:
        if not hasattr(obj, name):
            raise _missing(f"attribute {name!r} on its {type(obj).__name__}", feature)


# ---- GaLore / Fira under ZeRO 1/2 ----------------------------------------------------------------


def is_zero_1_2_optimizer(optimizer) -> bool:
    """Whether `optimizer` (an engine's `.optimizer`) is DeepSpeed's ZeRO stage 1/2 optimizer."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(optimizer, DeepSpeedZeroOptimizer)


def extend_zero_step(
    zero_opt,
    before_step: Callable[[], Optional[torch.Tensor]],
    after_step: Callable[[bool, Optional[torch.Tensor], float], None],
) -> None:
    """Make the ZeRO 1/2 optimizer `zero_opt` run megatrain's work around its own step.

    `before_step()` runs first and returns the squared L2 norm (unscaled fp32 scalar, or None) of
    gradients ZeRO does not hold; it is added to the norm ZeRO clips with, checks for overflow and
    reports (engine.get_global_grad_norm). `after_step(applied, grad_norm, clip_grad)` runs after
    ZeRO's step, with `applied` False when ZeRO dropped the update (overflow), `grad_norm` the
    unscaled global norm ZeRO computed (a tensor, or None when it computed none) and `clip_grad`
    the clipping threshold ZeRO applied it with (0: none; a resumed ZeRO optimizer keeps the one
    saved in its checkpoint).
    """
    _require(zero_opt, _ZERO_INSTANCE, ZERO_STEP)
    zero_norm, zero_step = zero_opt.scaled_global_norm, zero_opt.step
    extra: list = [None]  # the squared norm for the step in progress

    def scaled_global_norm(norm_type=2):
        norm = zero_norm(norm_type)
        if extra[0] is None:
            return norm
        ours = extra[0].to(norm.device) * float(zero_opt.loss_scale) ** 2
        # DeepSpeed reports an invalid norm as -1: keep it invalid.
        return torch.where(norm < 0, norm, torch.sqrt(norm.float() ** 2 + ours))

    def step(closure=None):
        extra[0] = before_step()
        try:
            out = zero_step(closure) if closure is not None else zero_step()
        finally:
            extra[0] = None
        norm = zero_opt._global_grad_norm
        if norm is not None and not torch.is_tensor(norm):
            norm = torch.tensor(float(norm))
        after_step(not zero_opt.overflow, norm, float(zero_opt.clip_grad or 0.0))
        return out

    zero_opt.scaled_global_norm = scaled_global_norm
    zero_opt.step = step


# ---- ReLoRA: DeepSpeed's fp32 masters and their optimizer-state fragments ------------------------


def keeps_fp32_master(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps `p` in a flat fp32 master group (ZeRO 1/2, bf16 at stage 0)."""
    return hasattr(p, "_hp_mapping")


def optimizer_state_linked(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed's optimizer-state fragments of master-kept `p` exist on every rank of its DP
    group (not before the first optimizer step). Collective over that group."""
    _require(p, ("_dp_group",), RELORA)
    mapping = p._hp_mapping
    if mapping is not None:
        _require(mapping, ("optim_fragment",), RELORA)
    missing = torch.tensor([0.0 if mapping is None or mapping.optim_fragment is not None else 1.0], device=p.device)
    if dist.is_initialized():
        dist.all_reduce(missing, group=p._dp_group)
    return missing.item() == 0


def relink_optimizer_state(optimizer) -> None:
    """Point DeepSpeed's per-parameter optimizer-state fragments at the current state tensors of
    `optimizer` (an engine's `.optimizer`): DeepSpeed links them lazily after its first step() and
    not after load_state_dict. Nothing to do when `optimizer` is the client itself (stage 0, fp32)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for lp_name, flat_name in _FLAT_GROUPS:
        if hasattr(optimizer, lp_name) and hasattr(optimizer, flat_name):
            pairs = zip(getattr(optimizer, lp_name), getattr(optimizer, flat_name))
            break
    else:
        raise _missing(
            f"flat parameter groups ({' or '.join('/'.join(pair) for pair in _FLAT_GROUPS)}) on its "
            f"{type(optimizer).__name__}",
            RELORA,
        )
    state = client_optimizer(optimizer).state
    for lp_params, flat in pairs:
        if flat in state and state[flat]:
            lazy_init_hp_params_optimizer_state(lp_params, flat, state)


def client_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrapper `optimizer` (or `optimizer` itself)."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        _require(optimizer, ("optimizer",), RELORA)
        optimizer = optimizer.optimizer
    return optimizer


def before_pipeline_step(engine, fn: Callable[[Optional[torch.Tensor]], None]) -> None:
    """Run `fn(loss)` in DeepSpeed's pipeline schedule right before its optimizer step (after every micro-batch's
    forward and backward and the gradient all-reduce): `loss` is the sum of the batch's micro-batch losses on
    the last stage (DeepSpeed's `total_loss`), None on the others. The trainer agrees there, as it does before
    `engine.step()` without a pipeline, whether to apply the step (`skip_next_step`) and whether to stop."""
    from deepspeed.runtime.pipe import schedule

    table = type(engine)._INSTRUCTION_MAP
    original = table[schedule.OptimizerStep]

    def optimizer_step(self, **kwargs):
        fn(self.total_loss if self.is_last_stage() else None)
        return original(self, **kwargs)

    engine._INSTRUCTION_MAP = {**table, schedule.OptimizerStep: optimizer_step}


# ---- The lean ZeRO 1/2 step ----------------------------------------------------------------------

# Instance attributes of the ZeRO 1/2 optimizer that lean_zero_step reads or replaces.
_LEAN_INSTANCE = (
    "get_grad_norm_direct",
    "scaled_global_norm",
    "unscale_and_clip_grads",
    "step",
    "dtype",
    "clip_grad",
    "loss_scale",
    "overflow",
    "dp_process_group",
    "model_parallel_rank",
    "device",
    "_model_parallel_all_reduce",
)


def lean_bf16_config(ds_config: dict, user: dict) -> bool:
    """Turn DeepSpeed's per-gradient bf16 overflow scan off in `ds_config` (a generated DeepSpeed config, edited
    in place) when `lean_zero_step` can stand in for it: bf16 at ZeRO stage 1 or 2, the gradient norm computed,
    no optimizer offload, the installed DeepSpeed has the key, and the user's `deepspeed` section (`user`)
    does not set `bf16.check_grad_overflow` itself. Returns whether it did (pass that to `lean_zero_step`)."""
    if not ds_config.get("bf16", {}).get("enabled"):
        return False
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") not in (1, 2) or zero.get("offload_optimizer") or zero.get("compute_grad_norm") is False:
        return False
    if "check_grad_overflow" in (user.get("bf16") or {}):
        return False
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    if "check_grad_overflow" not in getattr(DeepSpeedBF16Config, "model_fields", {}):
        return False
    ds_config["bf16"]["check_grad_overflow"] = False
    return True


def lean_zero_step(optimizer, check_norm: bool) -> bool:
    """Replace the per-parameter bookkeeping of DeepSpeed's ZeRO 1/2 `optimizer` (an engine's `.optimizer`) on the
    instance (this module's docstring). `check_norm` (what `lean_bf16_config` returned) also drops the step when
    the global gradient norm is not finite. Returns False, leaving DeepSpeed's step as it is, for any other
    optimizer or a DeepSpeed without the attributes it needs."""
    if not is_zero_1_2_optimizer(optimizer):
        return False
    missing = [name for name in _LEAN_INSTANCE if not hasattr(optimizer, name)]
    try:
        from deepspeed import comm as ds_comm
        from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
        from deepspeed.runtime.zero.utils import get_norm_dtype
    except ImportError as exc:
        missing.append(str(exc))
    if missing:
        if check_norm:  # the scan was turned off for this step: it must have its stand-in
            raise _missing(f"{', '.join(missing)} on its ZeRO 1/2 optimizer", "the bf16 ZeRO 1/2 step")
        log.info("DeepSpeed %s: ZeRO 1/2 keeps its own step (no %s)", _version(), ", ".join(missing))
        return False
    zero_norm, zero_direct = optimizer.scaled_global_norm, optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return zero_direct(gradients, params, norm_type)
        counted = []
        # DeepSpeed's pairing: padding gradients are left out of the gradients only.
        kept = (g for g in gradients if not getattr(g, "_zero_padding", False))
        for g, p in zip(kept, params):
            if getattr(p, "ds_pipe_replicated", False):  # a pipeline's copy of a tied weight: counted once
                continue
            if is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0:
                counted.append(g.detach())
        if counted:
            norms = torch._foreach_norm(counted, 2, dtype=get_norm_dtype())
            total = torch.stack(norms).pow(2).sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        ds_comm.all_reduce(total, op=ds_comm.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=ds_comm.ReduceOp.SUM)
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.get_grad_norm_direct = get_grad_norm_direct
    zero_clip = optimizer.unscale_and_clip_grads

    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        if not torch.is_tensor(total_norm):
            return zero_clip(grad_groups_flat, total_norm)
        clip_grad, loss_scale = optimizer.clip_grad, optimizer.loss_scale
        if clip_grad == 0.0 and loss_scale == 1.0:
            return None
        combined_scale = loss_scale
        if clip_grad > 0.0:
            # DeepSpeed's rule (an invalid norm clips as inf) on the device, without its host read per group.
            clip_norm = torch.where(torch.isfinite(total_norm) & (total_norm >= 0), total_norm, float("inf"))
            clip = torch.clamp(((clip_norm / loss_scale) + 1e-6) / clip_grad, min=1.0)
            combined_scale = clip * loss_scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else (grad,):
                g.data.mul_(1.0 / combined_scale)
        return None

    optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    # Whether step() drops the update on an invalid norm: DeepSpeed checks it for fp32 (and for bf16 when its
    # scan is kept on); for bf16 without the scan the wrapper below does. A dynamic (fp16) loss scale would
    # shrink on a dropped step, so it takes no device-side drop.
    drops_on_invalid = optimizer.dtype != torch.bfloat16 or bool(getattr(optimizer, "check_grad_overflow", True))
    optimizer.megatrain_device_drop = (
        (check_norm or drops_on_invalid)
        and getattr(optimizer, "compute_grad_norm", True)
        and not getattr(optimizer, "dynamic_loss_scale", False)
        and optimizer.dtype in (torch.float32, torch.bfloat16)
    )
    optimizer.megatrain_drop = None

    def scaled_global_norm(norm_type=2):
        norm = zero_norm(norm_type)
        drop, optimizer.megatrain_drop = optimizer.megatrain_drop, None
        if drop is not None:  # the trainer's decision, on the device: DeepSpeed's invalid-norm sentinel drops it
            norm = torch.where(drop, -1.0, norm)
        # DeepSpeed's invalid norm is -1 or inf; step() reads overflow right after this returns.
        if check_norm and bool((~torch.isfinite(norm) | (norm < 0)).any()):
            optimizer.overflow = True
        return norm

    optimizer.scaled_global_norm = scaled_global_norm
    zero_step = optimizer.step

    def step(*args, **kwargs):
        try:
            return zero_step(*args, **kwargs)
        finally:  # a flag is for one step (an earlier overflow check may have dropped it without the norm)
            optimizer.megatrain_drop = None

    optimizer.step = step
    return True


# Instance attributes of DeepSpeed's stage-0 bf16 optimizer (FP16_UnfusedOptimizer) that lean_stage0_step uses.
_STAGE0_INSTANCE = (
    "fp16_groups",
    "fp32_groups",
    "optimizer",
    "clip_grad",
    "loss_scale_config",
    "low_precision_dtype",
    "fused_lamb_legacy",
    "mpu",
    "overflow",
    "_global_grad_norm",
    "zero_grad",
    "_update_scale",
    "step",
)


def lean_stage0_step(optimizer) -> bool:
    """Replace the step of DeepSpeed's bf16 optimizer without ZeRO (`FP16_UnfusedOptimizer`, which DeepSpeed
    wraps around a client that is not its FusedAdam at `zero_optimization.stage` 0) on the instance. Its own
    step reads the device once per gradient tensor (an inf/NaN check each) and twice per parameter group (the
    norm), and casts, clips and copies tensor by tensor. The lean step keeps its rules (skip on a non-finite
    gradient or norm, the norm over tensor-parallel slices on their own rank and the rest on TP rank 0 summed
    over the model-parallel group, pipeline-replicated weights left out, the clip factor, the fp32 masters
    copied back to the bf16 weights) with one fp64 multi-tensor norm, one host read (which also takes
    `drop_step_on_device`'s flag), and multi-tensor clip and copy. The norm is fp64 where DeepSpeed's is
    fp32, so the clip factor, and the weights, may differ from DeepSpeed's in the last bits. Returns False,
    leaving DeepSpeed's step, for any other optimizer, a dynamic or non-1 loss scale, fp16, or a
    DeepSpeed without the attributes it needs."""
    if type(optimizer).__name__ != "FP16_UnfusedOptimizer":
        return False
    missing = [name for name in _STAGE0_INSTANCE if not hasattr(optimizer, name)]
    try:
        from deepspeed import comm as ds_comm
        from deepspeed.runtime.utils import is_model_parallel_parameter
        from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank
    except ImportError as exc:
        missing.append(str(exc))
    if missing:
        log.info("DeepSpeed %s: the stage-0 bf16 optimizer keeps its own step (no %s)", _version(), ", ".join(missing))
        return False
    scale = optimizer.loss_scale_config
    if (
        optimizer.low_precision_dtype != torch.bfloat16
        or optimizer.fused_lamb_legacy
        or getattr(scale, "dynamic_loss_scale", True)
        or getattr(scale, "cur_scale", None) != 1.0
        or getattr(optimizer, "custom_loss_scaler", False)
    ):
        return False
    mpu = optimizer.mpu
    tp_rank = bwc_tensor_model_parallel_rank(mpu=mpu)

    def step(closure=None):
        drop, optimizer.megatrain_drop = optimizer.megatrain_drop, None
        pairs = [pair for lp, hp in zip(optimizer.fp16_groups, optimizer.fp32_groups) for pair in zip(lp, hp)]
        counted = [
            lp.grad.detach()
            for lp, _ in pairs
            if lp.grad is not None
            and not getattr(lp, "ds_pipe_replicated", False)
            and (tp_rank == 0 or is_model_parallel_parameter(lp))
        ]
        device = pairs[0][0].device if pairs else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        if counted:
            total = torch.stack(torch._foreach_norm(counted, 2, dtype=torch.float64)).pow(2).sum()
        if mpu is not None:
            ds_comm.all_reduce(total, op=ds_comm.ReduceOp.SUM, group=mpu.get_model_parallel_group())
        norm = total.sqrt()
        invalid = ~torch.isfinite(norm)  # a non-finite gradient anywhere makes the norm non-finite
        if drop is not None:
            invalid = invalid | drop
        if bool(invalid):  # the step's one host read
            optimizer.overflow = True
            optimizer._global_grad_norm = float("inf")
            optimizer._update_scale(True)
            optimizer.zero_grad(set_to_none=True)
            for _, hp in pairs:
                hp.grad = None
            return True
        optimizer.overflow = False
        optimizer._global_grad_norm = norm
        optimizer._update_scale(False)
        hp_grads = []
        for lp, hp in pairs:  # the fp32 gradients, alive only inside the step (as DeepSpeed's)
            hp.grad = torch.zeros_like(hp) if lp.grad is None else lp.grad.to(hp.dtype)
            hp_grads.append(hp.grad)
        if optimizer.clip_grad > 0.0 and hp_grads:
            clip = torch.clamp((norm + 1e-6) / optimizer.clip_grad, min=1.0)
            torch._foreach_mul_(hp_grads, (1.0 / clip).float())  # as DeepSpeed: times the reciprocal, in fp32
        optimizer.optimizer.step()
        for _, hp in pairs:
            hp.grad = None
        if pairs:
            torch._foreach_copy_([lp.data for lp, _ in pairs], [hp.data for _, hp in pairs])
        return False

    optimizer.step = step
    optimizer.megatrain_device_drop = True
    optimizer.megatrain_drop = None
    return True


def lean_zero3_step(optimizer) -> bool:
    """Let DeepSpeed's ZeRO-3 optimizer (`DeepSpeedZeroOptimizer_Stage3`) take `drop_step_on_device`'s flag: its
    step already reads the combined gradient norm once to decide a skip, so `_get_norm_groups` is wrapped on
    the instance to make the first group's norm NaN where the flag is set (NaN stays invalid however the
    groups are combined) and `step` to forget the flag after each step. fp32 and bf16 without optimizer
    offload (whose norms live on the host) only. Returns whether it did."""
    if type(optimizer).__name__ != "DeepSpeedZeroOptimizer_Stage3":
        return False
    if any(not hasattr(optimizer, name) for name in ("_get_norm_groups", "step", "dtype")):
        log.info("DeepSpeed %s: ZeRO-3 decides its skips on its own (no _get_norm_groups)", _version())
        return False
    if (
        getattr(optimizer, "offload_optimizer", True)
        or getattr(optimizer, "dynamic_loss_scale", True)
        or optimizer.dtype not in (torch.float32, torch.bfloat16)
    ):
        return False
    zero_groups, zero_step = optimizer._get_norm_groups, optimizer.step

    def _get_norm_groups():
        groups = list(zero_groups())
        drop, optimizer.megatrain_drop = optimizer.megatrain_drop, None
        if drop is not None and groups:
            first = torch.as_tensor(groups[0], dtype=torch.float32, device=drop.device)
            groups[0] = torch.where(drop, float("nan"), first)
        return groups

    def step(*args, **kwargs):
        try:
            return zero_step(*args, **kwargs)
        finally:
            optimizer.megatrain_drop = None

    optimizer._get_norm_groups, optimizer.step = _get_norm_groups, step
    optimizer.megatrain_device_drop = True
    optimizer.megatrain_drop = None
    return True


def drop_step_on_device(optimizer, drop: torch.Tensor) -> bool:
    """Have the next `step()` of a lean ZeRO 1/2 `optimizer` drop its update where the 0-dim bool tensor `drop`
    is true, decided on the device: the flag is folded into the global gradient norm (as DeepSpeed's invalid
    norm -1), so the step's one host read of the norm, which it makes anyway, decides both. Returns False,
    setting nothing, for an optimizer that cannot take it (not lean, no norm computed, fp16, or bf16 with
    the checks turned off by the user): the caller then decides on the host (`skip_next_step`)."""
    if not getattr(optimizer, "megatrain_device_drop", False):
        return False
    optimizer.megatrain_drop = drop
    return True
