"""Pipeline parallelism: the Transformer as a sequence of layers for DeepSpeed's pipeline engine.

The model in models/ stays written once. `pipeline_layers` wraps its own modules, in order, as the
layers DeepSpeed's `PipelineModule` runs one after another:

    0: EmbedLayer (model.embed)   1..L: BlockLayer (model.blocks[i])   L+1: HeadLayer (model.norm, model.head)

and the pipeline's loss_fn calls the head's own forward with the labels (the fused
cross-entropy stays inside `LMHead.forward`). With a tied head (model.tie_embeddings) the embedding and
the head are DeepSpeed `TiedLayerSpec`s under one key, `embed`:

    0: tied_layer (model.embed)   1..L: BlockLayer   L+1: HeadLayer (model.norm)   L+2: tied_layer (model.head)

the first stage holds the embedding, the last the head, each with its own copy of the one weight
(`tied_modules.embed.weight`); DeepSpeed broadcasts it from the first stage at the start and all-reduces
its gradient between the two stages before every optimizer step, so both copies take the same updates.

Between stages the activations are the residual stream as the blocks carry it
(`Block.forward(carry_residual=True)`: the MLP output and the stream before it), so every residual add
is fused into the next norm exactly as in one process, and the losses equal the single-process ones.

A stage holds only its own layers: the other stages' modules are dropped from the meta-device model
before `parallelize` materialises (and tensor-splits) what is left. Parameter names inside the
pipeline are DeepSpeed's (`<layer index>.<wrapper attribute>.<name>`, `tied_modules.embed.weight`);
`transformer_name` maps them back to the Transformer's names, which checkpoints' model.safetensors, export,
`megatrain.load` and the universal checkpoints of `megatrain reshard` use.

Ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model): TP groups
are consecutive ranks, DP groups take one rank of each TP group inside a stage, and stage s holds the
ranks [s * world / S, (s + 1) * world / S) (megatrain.parallel.groups).
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatrain.errors import ConfigError
from megatrain.models.attention import iha_rope_positions
from megatrain.models.transformer import Transformer

__all__ = [
    "build_pipeline_groups",
    "pipeline_layout",
    "EmbedLayer",
    "BlockLayer",
    "HeadLayer",
    "tied_layer",
    "check_pipeline",
    "layer_weights",
    "stage_bounds",
    "stage_layers",
    "pipeline_layers",
    "transformer_name",
    "pipeline_name",
    "pipeline_universal_info",
    "drop_other_stages",
    "pipeline_module",
]


def check_pipeline(parallel, m, train=None, optim_name: Optional[str] = None) -> None:
    """Raise ConfigError (one line) unless `parallel.pipeline` stages split the resolved ModelConfig `m`
    and the rest of the run composes with DeepSpeed's pipeline engine (what cannot is named)."""
    stages = parallel.pipeline
    if stages < 1:
        raise ConfigError(f"parallel.pipeline must be >= 1, got {stages}")
    if parallel.microbatches is not None and parallel.microbatches < 1:
        raise ConfigError(f"parallel.microbatches must be >= 1, got {parallel.microbatches}")
    if parallel.pipeline_partition is not None:
        part = list(parallel.pipeline_partition)
        if len(part) != stages or sum(part) != m.layers or min(part) < 0:
            raise ConfigError(
                f"parallel.pipeline_partition={part} must list the decoder blocks of each of the "
                f"parallel.pipeline={stages} stages, summing to model.layers={m.layers}"
            )
    if stages == 1:
        return
    if stages > m.layers:
        raise ConfigError(f"parallel.pipeline={stages} is more stages than model.layers={m.layers}")
    refused = []
    if parallel.zero_stage in (2, 3):
        refused.append(
            f"parallel.zero_stage={parallel.zero_stage} (DeepSpeed's pipeline engine allows ZeRO 0 or 1; "
            f"use parallel.zero_stage=1)"
        )
    elif parallel.zero_stage == 0:
        refused.append(
            "parallel.zero_stage=0 (DeepSpeed's stage-0 gradient clipping counts the replicated weights of "
            "the first stage only; use parallel.zero_stage=1)"
        )
    if m.linear == "relora":
        refused.append("model.linear=relora (its restarts merge whole layers outside the pipeline schedule)")
    if optim_name in ("galore", "fira"):
        refused.append(f"optim.name={optim_name} (its projected weights are stepped outside DeepSpeed's optimizer)")
    if train is not None and train.compile:
        refused.append("train.compile=true")
    if refused:
        raise ConfigError(f"parallel.pipeline={stages} with {refused[0]} is not supported")


def pipeline_layout(world_size: int, tensor: int, stages: int) -> tuple[list[list[int]], list[list[int]]]:
    """(TP groups, DP groups) as rank lists for DeepSpeed's pipe x data x model topology: stage s holds
    ranks [s * world / S, (s + 1) * world / S), TP groups are consecutive ranks inside it and a DP group
    takes one rank of each TP group of one stage."""
    if tensor < 1 or stages < 1 or world_size % (tensor * stages):
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline = {tensor} x {stages} does not divide the world size {world_size}"
        )
    per_stage = world_size // stages
    tp_groups = [list(range(start, start + tensor)) for start in range(0, world_size, tensor)]
    dp_groups = [
        list(range(stage * per_stage + offset, (stage + 1) * per_stage, tensor))
        for stage in range(stages)
        for offset in range(tensor)
    ]
    return tp_groups, dp_groups


def build_pipeline_groups(tensor: int, stages: int):
    """This rank's ParallelGroups on the pipe x data x model topology (collective: every rank calls it)."""
    import torch.distributed as dist

    from megatrain.parallel.groups import ParallelGroups

    rank, world = dist.get_rank(), dist.get_world_size()
    tp_groups, dp_groups = pipeline_layout(world, tensor, stages)
    found = {}
    for kind, lists in (("tp", tp_groups), ("dp", dp_groups)):  # new_group is collective: same order everywhere
        for ranks in lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                found[kind] = group
    per_stage = world // stages
    return ParallelGroups(
        rank=rank,
        world_size=world,
        tp_rank=rank % tensor,
        tp_size=tensor,
        dp_rank=(rank % per_stage) // tensor,
        dp_size=per_stage // tensor,
        tp_group=found["tp"],
        dp_group=found["dp"],
        pp_rank=rank // per_stage,
        pp_size=stages,
    )


def layer_weights(model: Transformer) -> list[int]:
    """Parameters of each pipeline layer of `model` (a meta-device model is enough)."""
    count = lambda *mods: sum(p.numel() for mod in mods for p in mod.parameters())  # noqa: E731
    return [count(model.embed), *(count(b) for b in model.blocks), count(model.norm, model.head)]


def stage_bounds(weights: Sequence[int], stages: int, blocks: Optional[Sequence[int]] = None) -> list[int]:
    """Stage boundaries over the pipeline layers (stage s runs layers [bounds[s], bounds[s + 1])).

    blocks: the decoder blocks of each stage (parallel.pipeline_partition; the embedding goes with the
    first stage, the final norm and head with the last); else contiguous stages that minimise the
    largest stage's parameter count, each stage at least one layer."""
    n = len(weights)
    if blocks is not None:
        bounds = [0]
        for i, count in enumerate(blocks):
            bounds.append(bounds[-1] + count + (1 if i == 0 else 0))
        bounds[-1] = n
        return bounds
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[j][i]: the smallest largest-stage weight splitting the first i layers into j stages.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for j in range(1, stages + 1):
        for i in range(j, n + 1):
            for k in range(j - 1, i):
                cost = max(best[j - 1][k], prefix[i] - prefix[k])
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, k
    bounds = [n]
    for j in range(stages, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    return bounds[::-1]


def stage_layers(bounds: Sequence[int], stage: int) -> range:
    """The pipeline layer indices stage `stage` runs."""
    return range(bounds[stage], bounds[stage + 1])


class _Rope(nn.Module):
    """The model's RoPE tables (non-persistent, as in the Transformer) and the positions of a training
    forward: arange(N) (IHA: its virtual positions)."""

    def __init__(self, model: Transformer, seq_factor: int):
        super().__init__()
        self.config, self.seq_factor = model.config, seq_factor
        self.register_buffer("cos", model.rope_cos, persistent=False)
        self.register_buffer("sin", model.rope_sin, persistent=False)

    def forward(self, n: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(n * self.seq_factor, device=self.cos.device)[None]
        cfg = self.config
        if cfg.attention == "iha":
            positions = iha_rope_positions(positions, cfg.iha.pseudo_heads, cfg.iha.rope)
        return self.cos[positions][0], self.sin[positions][0]


class EmbedLayer(nn.Module):
    """input_ids [B, N] -> the residual stream [B, N, D] (the model's embedding)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)


class BlockLayer(nn.Module):
    """One decoder block: the stream h (after the embedding) or (MLP output, stream) -> (MLP output, stream)."""

    def __init__(self, block: nn.Module, layer_idx: int, rope: _Rope, checkpointed: bool = False):
        super().__init__()
        self.block, self.layer_idx, self.checkpointed = block, layer_idx, checkpointed
        self.rope = rope

    def forward(self, x):
        h, residual = (x, None) if isinstance(x, Tensor) else x
        cos, sin = self.rope(h.shape[1])
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(
                self.block,
                h,
                cos,
                sin,
                layer_idx=self.layer_idx,
                residual=residual,
                carry_residual=True,
                use_reentrant=False,
            )
        return self.block(h, cos, sin, layer_idx=self.layer_idx, residual=residual, carry_residual=True)


class HeadLayer(nn.Module):
    """The final norm (the last residual add fused into it); the head, when untied, is held here and run by
    the pipeline's loss_fn (tied: it is a layer of its own, see `tied_layer`)."""

    def __init__(self, norm: nn.Module, head: Optional[nn.Module]):
        super().__init__()
        self.norm = norm
        if head is not None:
            self.head = head

    def forward(self, x) -> Tensor:
        h, residual = (x, None) if isinstance(x, Tensor) else x
        return self.norm(h) if residual is None else self.norm(h, residual=residual)[0]


def tied_layer(key: str, module: Optional[nn.Module], forward_fn=None):
    """DeepSpeed's TiedLayerSpec over a module that already exists (`module`; None on a stage that does not
    build it): the embedding on the first stage, the head on the last, sharing `weight` under `key`."""
    from deepspeed.pipe import TiedLayerSpec

    class TiedLayer(TiedLayerSpec):
        def build(self, log=False):
            return module

    return TiedLayer(key, type(module) if module is not None else nn.Module, forward_fn=forward_fn)


def _pass_normed(head: nn.Module, normed: Tensor) -> Tensor:
    """The tied head's layer: the normed stream goes on to the pipeline's loss_fn, which runs the head."""
    return normed


def pipeline_layers(
    model: Transformer, *, checkpointed: bool = False, seq_factor: int = 1, keep: Optional[range] = None
) -> list:
    """The pipeline layers over `model`'s own modules (layers outside `keep` are nn.Identity stand-ins, or a
    TiedLayer without a module: DeepSpeed never builds them on this stage). seq_factor: sequence-parallel TP
    size (the stream holds N / T tokens per rank, the rotary positions cover N). A tied head adds a layer
    (see the module docstring)."""
    tied = model.config.tie_embeddings
    last = len(model.blocks) + 1
    keep = range(last + 1 + tied) if keep is None else keep
    rope = _Rope(model, seq_factor)
    if tied:
        layers: list = [tied_layer("embed", model.embed if 0 in keep else None)]
    else:
        layers = [EmbedLayer(model.embed) if 0 in keep else nn.Identity()]
    for i, block in enumerate(model.blocks):
        layers.append(BlockLayer(block, i, rope, checkpointed) if i + 1 in keep else nn.Identity())
    layers.append(HeadLayer(model.norm, None if tied else model.head) if last in keep else nn.Identity())
    if tied:
        layers.append(tied_layer("embed", model.head if last + 1 in keep else None, forward_fn=_pass_normed))
    return layers


_PIPE_NAME = re.compile(r"^(\d+)\.(embed|block|norm|head)\.(.*)$")
_TIED_PREFIX = "tied_modules.embed."


def transformer_name(name: str, layers: int) -> str:
    """The Transformer's name of pipeline parameter `name` (`3.block.attn.q_proj.weight` ->
    `blocks.2.attn.q_proj.weight`, a tied `tied_modules.embed.weight` -> `embed.weight`) for a model of
    `layers` blocks; ValueError for an unknown name."""
    if name.startswith(_TIED_PREFIX):
        return "embed." + name[len(_TIED_PREFIX) :]
    match = _PIPE_NAME.match(name)
    if match is None:
        raise ValueError(f"not a pipeline parameter name: {name!r}")
    index, attr, rest = int(match.group(1)), match.group(2), match.group(3)
    if attr == "block" and 1 <= index <= layers:
        return f"blocks.{index - 1}.{rest}"
    if (attr == "embed" and index == 0) or (attr in ("norm", "head") and index == layers + 1):
        return f"{attr}.{rest}"
    raise ValueError(f"pipeline parameter {name!r} does not fit a model of {layers} layers")


def pipeline_name(name: str, layers: int, tied: bool = False) -> str:
    """The inverse of `transformer_name` (tied: model.tie_embeddings, the embedding is a TiedLayer)."""
    head, _, rest = name.partition(".")
    if head == "blocks":
        index, _, rest = rest.partition(".")
        return f"{int(index) + 1}.block.{rest}"
    if head == "embed":
        return _TIED_PREFIX + rest if tied else f"0.embed.{rest}"
    if head in ("norm", "head"):
        return f"{layers + 1}.{head}.{rest}"
    raise ValueError(f"not a Transformer parameter name: {name!r}")


def pipeline_universal_info(model_cfg) -> dict:
    """What DeepSpeed's universal-checkpoint converter needs from a pipelined run: the tensor-parallel merge
    patterns of the whole model (`megatrain.parallel.plan.universal_checkpoint_info`, which every stage's
    files carry alike) under the pipeline's names, and the tied weight, which every stage but the first
    skips (its copy on the last stage is the same tensor)."""
    from deepspeed.checkpoint.constants import PIPELINE_REPLICATED_PARAMETER_PATTERNS

    from megatrain.parallel.plan import universal_checkpoint_info

    full = Transformer(model_cfg, seed=0, device="meta")
    info = universal_checkpoint_info(full, held={id(p) for p in full.parameters() if p.requires_grad})
    tied = model_cfg.tie_embeddings
    rename = {
        re.escape(n) + "$": re.escape(pipeline_name(n, model_cfg.layers, tied)) + "$"
        for n, _ in full.named_parameters()
    }
    out = {key: [rename[p] for p in value] if isinstance(value, list) else value for key, value in info.items()}
    if tied:
        out[PIPELINE_REPLICATED_PARAMETER_PATTERNS] = [re.escape(_TIED_PREFIX + "weight") + "$"]
    return out


def drop_other_stages(model: Transformer, keep: range) -> None:
    """Replace the modules of layers outside `keep` by parameter-less stand-ins, so that materialising and
    tensor-splitting `model` touches only this stage's share. With a tied head, the first and the last stage
    keep both the embedding and the head module: they hold one tensor, the weight they share."""
    last = len(model.blocks) + 1
    tied_here = model.config.tie_embeddings and (0 in keep or last in keep)
    if 0 not in keep and not tied_here:
        del model.embed
    for i in range(len(model.blocks)):
        if i + 1 not in keep:
            model.blocks[i] = nn.Identity()
    if last not in keep:
        del model.norm
        if not tied_here:
            del model.head


def pipeline_module(
    model: Transformer, groups, bounds: Sequence[int], *, checkpointed: bool = False, seq_factor: int = 1
):
    """DeepSpeed's PipelineModule over this stage's part of `model` (already materialised and split;
    `drop_other_stages` first), on the DP x PP x TP topology of `groups`. Collective."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    class TransformerPipe(PipelineModule):
        """A PipelineModule with megatrain's stage boundaries (`stage_bounds`)."""

        def _partition_layers(self, method="uniform"):
            self.parts = list(bounds)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    keep = stage_layers(bounds, groups.pp_rank)
    layers = pipeline_layers(model, checkpointed=checkpointed, seq_factor=seq_factor, keep=keep)
    loss_fn = None
    if len(model.blocks) + 1 in keep:  # the last stage: the head's forward with the labels is the loss
        loss_fn = _HeadLoss(model.head)
    topology = PipeModelDataParallelTopology(num_pp=groups.pp_size, num_mp=groups.tp_size, num_dp=groups.dp_size)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its seed settings on rank 0
        pipe = TransformerPipe(
            layers,
            topology=topology,
            loss_fn=loss_fn,
            partition_method="uniform",
        )
    pipe.model_config = model.config
    pipe.stage_bounds = list(bounds)
    pipe.universal_checkpoint_info = pipeline_universal_info(model.config)
    return pipe


class _HeadLoss:
    """The pipeline's loss_fn: (normed stream, labels) -> the head's forward with the labels (the fused
    cross-entropy inside `LMHead.forward`), the head being untied or the last stage's tied copy."""

    def __init__(self, head: nn.Module):
        self.head = head

    def __call__(self, normed: Tensor, labels: Tensor) -> Tensor:
        return self.head(normed, labels)
