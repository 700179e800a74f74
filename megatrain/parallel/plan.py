"""The tensor-parallel plan: one ordered table saying which role each module of the model plays,
from which everything that knows how a model is split over the TP group is derived.

| module (full match)                 | role       | its parameters over T ranks                              |
|-------------------------------------|------------|----------------------------------------------------------|
| `embed`                             | vocab      | weight rows (vocabulary) split                           |
| `head`                              | vocab      | weight rows split (tied: the embedding's slice)          |
| `blocks.i.attn`                     | heads      | heads split; IHA's mix_q/k/v, collapse whole, their      |
|                                     |            | gradients summed over the group (model.iha.tp_mode       |
|                                     |            | exact: q/k/v heads all-gathered; local: own heads only)  |
| `blocks.i.attn.q_proj`              | column     | weight, bias rows (outputs) split                        |
| `blocks.i.attn.k_proj`, `v_proj`    | kv_column  | rows split by KV head; with kv_heads < T each head is    |
|                                     |            | held by T/kv_heads consecutive ranks (`kv_replicas`)     |
| `blocks.i.attn.o_proj`              | row        | weight columns (inputs) split, bias whole                |
| `blocks.i.mlp`                      | region     | none of its own (the TP region's entry communication)    |
| `blocks.i.mlp.gate_proj`, `up_proj` | column     | as q_proj                                                |
| `blocks.i.mlp.down_proj`            | row        | as o_proj                                                |
| `blocks.i.attn_norm`, `mlp_norm`,   | replicated | whole (sequence-parallel norms with parallel.sequence)   |
| `norm`                              |            |                                                          |

A parameter belongs to the entry of the module that owns it directly (`blocks.0.attn.mix_q` to
`blocks.0.attn`); each such module must match exactly one entry. A role names the parameters it
splits and along which dim; the module's other parameters are whole on every rank.

Consumers, all reading `TP_PLAN`:
- `parallelize.apply_plan` swaps every matched module for its role's TP layer, in table order (the
  embedding before the head, so a tied head takes the embedding's slice);
- `shard_specs`: how each parameter's full tensor lies over the TP ranks (engine/checkpoint.py joins
  the slices for model.safetensors with it);
- `universal_checkpoint_info`: the merge patterns DeepSpeed's universal-checkpoint converter reads;
- `is_kv_split`: the key/value parameters that engine/reshard.py de-duplicates after the converter
  and repeats again for a target layout where kv_heads < TP.

Low-rank projections (model.linear=cola|sltrain|lora) take the same column / row roles: the roles
name their factors too (b split along D_out in column roles, a along D_in in row roles, the other
factor whole), and parallelize builds the low-rank TP layers of lowrank_parallel.py for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from megatrain.parallel.groups import kv_replicas

__all__ = [
    "Role",
    "PlanEntry",
    "TPPlan",
    "TP_PLAN",
    "COLUMN",
    "KV_COLUMN",
    "ROW",
    "VOCAB",
    "REPLICATED",
    "HEADS",
    "REGION",
    "ShardSpec",
    "shard_specs",
    "universal_checkpoint_info",
    "is_kv_split",
]


@dataclass(frozen=True)
class Role:
    """How the parameters a module owns directly lie over the tensor-parallel group.

    split: parameter name -> the dim its full tensor is cut along into T equal slices, rank r
        holding slice r. Parameters not named are whole on every rank.
    kv_heads: the split is by key/value head; with fewer KV heads than TP ranks each slice is held
        by `kv_replicas(kv_heads, T)` consecutive ranks.
    summed_grads: whole parameters of which each rank differentiates only its own heads' part, so
        their gradients are summed over the TP group (IHA's mixing and collapse tensors).
    """

    name: str
    split: Mapping[str, int] = field(default_factory=dict)
    kv_heads: bool = False
    summed_grads: tuple[str, ...] = ()


VOCAB = Role("vocab", split={"weight": 0})
# Low-rank kinds (a [D_in, r], b [r, D_out]; megatrain.parallel.lowrank_parallel): a column role splits b
# (and LoRA's W) along D_out and keeps a whole; a row role splits a (and W) along D_in and keeps b whole.
# SLTrain's sparse values and support are whole on every rank.
COLUMN = Role("column", split={"weight": 0, "bias": 0, "cola_b": 1, "lora_b": 1})
KV_COLUMN = Role("kv_column", split={"weight": 0, "bias": 0, "cola_b": 1, "lora_b": 1}, kv_heads=True)
ROW = Role("row", split={"weight": 1, "cola_a": 0, "lora_a": 0})  # the bias is added once, after the reduction
HEADS = Role("heads", summed_grads=("mix_q", "mix_k", "mix_v", "collapse"))
REGION = Role("region")
REPLICATED = Role("replicated")


@dataclass(frozen=True)
class PlanEntry:
    """A module-name regex (matched against the whole dotted name) and the role of those modules."""

    pattern: str
    role: Role

    def matches(self, module_name: str) -> bool:
        return re.fullmatch(self.pattern, module_name) is not None


@dataclass(frozen=True)
class TPPlan:
    """An ordered table of PlanEntry; `parallelize` applies the entries in this order."""

    entries: tuple[PlanEntry, ...]

    def role_of(self, module_name: str) -> Optional[Role]:
        """The role of module `module_name`, None when no entry matches; ValueError when several do."""
        found = [e for e in self.entries if e.matches(module_name)]
        if len(found) > 1:
            raise ValueError(
                f"tensor-parallel plan: module '{module_name}' matches several entries: "
                f"{', '.join(e.pattern for e in found)}"
            )
        return found[0].role if found else None

    def role_of_parameter(self, name: str) -> Role:
        """The role of the module that owns parameter (or buffer) `name`; ValueError when unplanned."""
        module_name, _, _ = name.rpartition(".")
        role = self.role_of(module_name)
        if role is None:
            raise ValueError(
                f"tensor-parallel plan: no entry for module '{module_name}' (parameter '{name}'); "
                f"add it to megatrain.parallel.plan.TP_PLAN"
            )
        return role


TP_PLAN = TPPlan(
    (
        PlanEntry(r"embed", VOCAB),
        PlanEntry(r"head", VOCAB),
        PlanEntry(r"blocks\.\d+\.attn", HEADS),
        PlanEntry(r"blocks\.\d+\.attn\.q_proj", COLUMN),
        PlanEntry(r"blocks\.\d+\.attn\.[kv]_proj", KV_COLUMN),
        PlanEntry(r"blocks\.\d+\.attn\.o_proj", ROW),
        PlanEntry(r"blocks\.\d+\.mlp", REGION),
        PlanEntry(r"blocks\.\d+\.mlp\.(gate|up)_proj", COLUMN),
        PlanEntry(r"blocks\.\d+\.mlp\.down_proj", ROW),
        PlanEntry(r"blocks\.\d+\.(attn|mlp)_norm", REPLICATED),
        PlanEntry(r"norm", REPLICATED),
    )
)


class ShardSpec(tuple):
    """(partition_dim, replicas): how a parameter's full tensor is split over the TP group.

    partition_dim None = replicated on every TP rank. replicas > 1 = consecutive groups of that many
    ranks hold the same slice (key/value heads when kv_heads < TP)."""

    __slots__ = ()

    def __new__(cls, partition_dim, replicas=1):
        return super().__new__(cls, (partition_dim, replicas))

    @property
    def partition_dim(self):
        return self[0]

    @property
    def replicas(self) -> int:
        return self[1]


def shard_specs(names: list[str], model_cfg, tp: int, plan: TPPlan = TP_PLAN) -> dict[str, ShardSpec]:
    """ShardSpec for each parameter (or buffer) name of a model at tensor-parallel size `tp`."""
    replicas = kv_replicas(model_cfg.kv_heads, tp)
    out = {}
    for name in names:
        role = plan.role_of_parameter(name)
        dim = role.split.get(name.rpartition(".")[2]) if tp > 1 else None
        out[name] = ShardSpec(dim, replicas if role.kv_heads and dim is not None else 1)
    return out


def is_kv_split(name: str, plan: TPPlan = TP_PLAN) -> bool:
    """Whether parameter `name` is split by key/value head (replicated over ranks when kv_heads < TP)."""
    module_name, _, param = name.rpartition(".")
    role = plan.role_of(module_name)
    return role is not None and role.kv_heads and param in role.split


def universal_checkpoint_info(model, plan: TPPlan = TP_PLAN, held: Optional[set] = None) -> dict:
    """What DeepSpeed's universal-checkpoint converter needs to merge our TP slices: parameters split
    along dim 1 are concatenated along dim 1 (its "row parallelism"), replicated parameters taken from
    one rank, everything else along dim 0. Exact names, because the converter refuses patterns that
    match nothing. held: the ids of the parameters the optimizer holds (default: every parameter); a
    frozen one (ReLoRA/LoRA's W) has no ZeRO state to merge, so it gets no pattern."""
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    # By name, not by the live TP size: a TP=1 checkpoint must say how to split for TP > 1.
    names = [name for name, _ in model.named_parameters()]
    specs = shard_specs(names, model.config, tp=2, plan=plan)
    kept = {name for name, p in model.named_parameters() if held is None or id(p) in held}
    row = [re.escape(n) + "$" for n in names if specs[n].partition_dim == 1 and n in kept]
    replicated = [re.escape(n) + "$" for n in names if specs[n].partition_dim is None and n in kept]
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    if row:
        info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = row
    if replicated:
        info[TP_REPLICATED_PARAMETER_PATTERNS] = replicated
    return info
