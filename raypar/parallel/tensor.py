"""Tensor parallelism for the GPT of raypar/model.py with DTensor: plain module in, parallel out.

    model = apply_tensor_parallel(model, pm.mesh["tp"], sequence_parallel=False)
    with loss_context(model):
        loss = lm_loss(model(x), y)
        loss.backward()
    norm = grad_sq_norm(params)  # then reduce over pp, sqrt, clip
    tp_shard_dim("layers.0.attn.wo.weight")  # 1: which dim of a parameter tp shards

The plan (Megatron-LM style), declared per module name in `_EDGE_PLAN` / `_BLOCK_PLAN`
and applied by torch's `parallelize_module`:

    tok_emb                 RowwiseParallel      weight sharded by vocab rows; the
                                                 masked partial lookups are summed
    layers.<i>.attn.w{q,k,v} ColwiseParallel     output features (= whole heads) sharded
    layers.<i>.attn.wo      RowwiseParallel      partial sums all-reduced
    layers.<i>.mlp.fc       ColwiseParallel
    layers.<i>.mlp.proj     RowwiseParallel
    lm_head                 ColwiseParallel      logits stay a DTensor sharded on the
                                                 vocab dim; the loss runs in loss_parallel()
    norms, pos_emb          replicated (plain tensors)

After each backward, a DTensor parameter's gradient is given the parameter's
own placements (see _grad_like_param), so `grad.to_local()` is shaped like the
local shard.

Each rank keeps n_head / tp heads; the model computes the head count from the
projection's width, so its attention code runs unchanged on the local shard.

With `sequence_parallel=True` the residual stream between the column/row pairs
is sharded on the sequence dim (dim 1): the norms run as `SequenceParallel`
(their weights become replicated DTensors), attention and MLP all-gather their
normalized input, and `wo` / `proj` reduce-scatter their output instead of
all-reducing it. Inside a stage a block's input and output are plain local
tensors of shape (B, T / tp, d_model).

Layouts at the edges of a module (pipeline stages included); all plain
torch.Tensors but the logits:
- token ids in: replicated (every tp rank gets the same batch);
- hidden states between pipeline stages, in and out: the full (B, T, d_model)
  tensor, replicated over tp, also with sequence_parallel. A stage with layers
  but without `tok_emb` slices its input to its sequence shard (no
  communication; its gradient is all-gathered back), and a stage without
  `lm_head` all-gathers its output. That keeps the stage's shapes those of the
  dense model, and keeps the rotary tables right: the model derives positions
  from its input's length. (A stage with neither layers nor the final norm has
  nothing to shard by sequence and runs the replicated plan.);
- logits out: a DTensor (B, T, vocab) placed Shard(-1) on the tp mesh, never
  gathered; compute the loss on it inside `loss_context(model)`, forward and
  backward. `lm_loss` works on it unchanged; the loss is a replicated DTensor
  (`.item()` works; `.full_tensor()` gives a plain tensor). Checked with
  torch.distributed.pipelining (1F1B, pp=2 x tp=2, with and without
  sequence_parallel): the last stage's per-micro-batch losses are DTensors.

Caveat, dropout > 0: tp peers draw dropout masks from their own RNG. The
training loop seeds tp peers identically, so masks on replicated activations
agree; attention-dropout masks (and, with sequence_parallel, residual masks on
each sequence shard) then repeat across shards. Dropout is off by default.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

__all__ = ["apply_tensor_parallel", "loss_context", "tp_compatible", "grad_sq_norm",
           "tp_shard_dim"]

# The plan: how each module is split over tp (see the module docstring). Every other
# module (norms, pos_emb) is replicated. apply_tensor_parallel builds torch's styles
# from these tables and tp_shard_dim answers from them, so they agree.
COLWISE, ROWWISE, VOCAB_ROWS = "colwise", "rowwise", "vocab_rows"
_EDGE_PLAN = {"tok_emb": VOCAB_ROWS, "lm_head": COLWISE}
_BLOCK_PLAN = {"attn.wq": COLWISE, "attn.wk": COLWISE, "attn.wv": COLWISE,
               "attn.wo": ROWWISE, "mlp.fc": COLWISE, "mlp.proj": ROWWISE}
# Dim of each parameter a style shards; a parameter not listed stays whole on every
# tp rank (a row-parallel bias is added once, after the all-reduce).
_SHARDED_DIMS = {COLWISE: {"weight": 0, "bias": 0},  # nn.Linear weight: (out, in)
                 ROWWISE: {"weight": 1},
                 VOCAB_ROWS: {"weight": 0}}          # nn.Embedding weight: (vocab, d)

_SEQ = Shard(1)  # the residual stream (B, T, d) sharded on T
_VOCAB_PARALLEL = "_raypar_vocab_parallel"  # set on an lm_head whose logits are vocab-sharded


class _FirstInput(ParallelStyle):
    """Take a module's first positional input as `layout` and redistribute it to `desired`.

    torch's PrepareModuleInput wants one layout per positional argument, and a
    Block or its attention is called with a varying number of them (rope tables,
    then a KV cache when generating); the extra arguments pass through here.
    """

    def __init__(self, layout: Placement, desired: Placement, use_local_output: bool):
        self.layout, self.desired, self.use_local_output = layout, desired, use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module, args):
            x, *rest = args
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (self.layout,), run_check=False)
            if x.placements != (self.desired,):
                x = x.redistribute(device_mesh, (self.desired,))
            return (x.to_local() if self.use_local_output else x, *rest)

        module.register_forward_pre_hook(hook)
        return module


def tp_compatible(n_head: int, vocab_size: int, tp: int) -> str | None:
    """None if a model with these sizes can be split `tp` ways, else a one-line reason."""
    if tp < 1:
        return f"parallel.tp ({tp}) must be at least 1"
    if n_head % tp:
        return f"model.n_head ({n_head}) must be divisible by parallel.tp ({tp})"
    if vocab_size % tp:
        return (f"the vocabulary size ({vocab_size}, data.vocab_size padded to a multiple of 64) "
                f"must be divisible by parallel.tp ({tp}); use a tp that divides 64")
    return None


def _style_of(module_name: str) -> str | None:
    """The plan's entry for a module of the plain model (its FQN), or None: replicated."""
    if module_name in _EDGE_PLAN:
        return _EDGE_PLAN[module_name]
    head, _, rest = module_name.partition(".")
    index, _, sub = rest.partition(".")
    if head == "layers" and index:
        return _BLOCK_PLAN.get(sub)
    return None


def tp_shard_dim(param_name: str) -> int | None:
    """The dim over which tensor parallelism shards a parameter of the plain model (or of
    a pipeline stage of it, by its FQN, e.g. 'layers.3.attn.wq.weight'), or None when
    every tp rank holds it whole. Each shard is 1/tp of that dim."""
    module_name, _, leaf = param_name.rpartition(".")
    style = _style_of(module_name)
    return None if style is None else _SHARDED_DIMS[style].get(leaf)


def _sharding(style: str, **kwargs) -> ParallelStyle:
    """torch's style for one of the plan's entries (VOCAB_ROWS: Rowwise on an embedding)."""
    return ColwiseParallel(**kwargs) if style == COLWISE else RowwiseParallel(**kwargs)


def _torch_plan(model: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """{module name (+ '.__entry' / '.__exit' for extra hooks): style}, in the order the
    styles must be applied: the sharding of the plan tables plus the layout changes
    around them (sequence parallelism, stage edges)."""
    tok_emb, pos_emb = model.tok_emb, model.pos_emb
    norm, lm_head = model.norm, model.lm_head
    layer_names = list(model.layers.keys())
    # The modules that run on sequence shards, in forward order; without any, a
    # stage has nothing to gain and runs the plain (replicated) plan.
    sp_region = [f"layers.{n}" for n in layer_names] + (["norm"] if norm is not None else [])
    sp = sequence_parallel and bool(sp_region)
    seq_or_whole = _SEQ if sp else Replicate()

    plan: dict[str, ParallelStyle] = {}
    if tok_emb is not None:
        plan["tok_emb"] = _sharding(_EDGE_PLAN["tok_emb"], input_layouts=Replicate(),
                                    output_layouts=seq_or_whole)
        if sp and pos_emb is not None:
            # pos_emb(arange(T)) is (T, d): keep this rank's positions (a slice).
            plan["pos_emb"] = PrepareModuleOutput(output_layouts=Replicate(),
                                                  desired_output_layouts=Shard(0))
    elif sp:
        # A stage boundary delivers the full hidden state: keep our sequence shard.
        first = sp_region[0]
        if first == "norm":
            plan["norm.__entry"] = PrepareModuleInput(input_layouts=Replicate(),
                                                      desired_input_layouts=_SEQ)
        else:
            plan[first + ".__entry"] = _FirstInput(Replicate(), _SEQ, use_local_output=True)

    for n in layer_names:
        p = f"layers.{n}"
        if sp:
            plan[f"{p}.attn_norm"] = SequenceParallel()
            plan[f"{p}.attn"] = _FirstInput(_SEQ, Replicate(), use_local_output=False)
            plan[f"{p}.mlp_norm"] = SequenceParallel()
            plan[f"{p}.mlp"] = PrepareModuleInput(input_layouts=_SEQ,
                                                  desired_input_layouts=Replicate())
        for sub, style in _BLOCK_PLAN.items():
            # A column-parallel output stays sharded on features into its row-parallel
            # partner, which reduces (sp: reduce-scatters) its partial sums.
            kwargs = {} if style == COLWISE else {"output_layouts": seq_or_whole}
            plan[f"{p}.{sub}"] = _sharding(style, **kwargs)

    if norm is not None and sp:
        plan["norm"] = SequenceParallel()
    if lm_head is not None:
        plan["lm_head"] = _sharding(_EDGE_PLAN["lm_head"], input_layouts=seq_or_whole,
                                    output_layouts=Shard(-1), use_local_output=False)
    elif sp:
        # The stage's output crosses to the next stage whole.
        plan[sp_region[-1] + ".__exit"] = PrepareModuleOutput(
            output_layouts=_SEQ, desired_output_layouts=Replicate(), use_local_output=True)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh,
                          sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` (a GPT or a pipeline stage of one) over the 1-D `tp_mesh`, in place.

    The model may be on the meta device (nothing allocated; then `to_empty()`,
    `keep_grad_layouts` and `GPT.init_weights(seed)`, whose keyed values put the right
    slice in every shard:
    DTensor's own random ops are not shard-aware on CPU, measured with torch 2.13), or
    hold the same full weights on every rank (each keeps its slice, no communication).
    Returns `model`; with a mesh of size 1, unchanged.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs a 1-D tp mesh, got {tp_mesh.ndim}-D")
    tp = tp_mesh.size()
    if tp == 1:
        return model
    cfg = model.cfg
    problem = tp_compatible(cfg.n_head, cfg.vocab_size, tp)
    if problem:
        raise ValueError(problem)
    tok_emb, lm_head = model.tok_emb, model.lm_head
    tied = cfg.tie_embeddings and tok_emb is not None and lm_head is not None
    if tied and lm_head.weight is not tok_emb.weight:
        raise ValueError("tie_embeddings is set but lm_head.weight is not tok_emb.weight")

    plan = _torch_plan(model, sequence_parallel)
    # Hooks run in registration order: an entry hook must precede the style of
    # the same module (SequenceParallel takes a plain tensor for a local shard).
    for key, style in plan.items():
        name = key.split(".__")[0]
        # src_data_rank=None: slice the local full tensors, no scatter/broadcast.
        parallelize_module(model.get_submodule(name), tp_mesh, style, src_data_rank=None)

    if not any(q.is_meta for q in model.parameters()):
        keep_grad_layouts(model)

    if lm_head is not None:
        setattr(lm_head, _VOCAB_PARALLEL, True)
    if tied:
        # Each side distributed its own handle on the shared weight; both are
        # Shard(0) of the same (vocab, d_model) tensor, so share one again.
        lm_head.weight = tok_emb.weight
        if lm_head.weight is not tok_emb.weight:
            raise RuntimeError("tensor parallel plan lost the tied embedding")
    return model


def keep_grad_layouts(model: nn.Module) -> None:
    """Have every DTensor parameter's gradient take the parameter's placements
    (`_grad_like_param`). apply_tensor_parallel does it for materialized weights; a model
    sharded on the meta device needs it once `to_empty()` has made its parameters (the
    hooks of the meta parameters no longer fire then, measured with torch 2.13)."""
    for param in {id(q): q for q in model.parameters()}.values():
        if isinstance(param, DTensor):
            param.register_post_accumulate_grad_hook(_grad_like_param)


@torch.no_grad()
def _grad_like_param(param: torch.Tensor) -> None:
    """Give a DTensor parameter's gradient the parameter's own placements.

    DTensor's backward can leave a gradient in another (equivalent) layout: the
    vocab-parallel embedding's weight gradient comes out Replicate (torch has no
    vocab-sharded embedding backward; the slice to Shard(0) is local), and with
    sequence parallelism a norm weight's gradient comes out Partial (this
    all-reduces it). Matching layouts keep the optimizer state, gradient
    accumulation and the gradient norm's sums shaped like the shards.
    """
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


def _vocab_sharded(module: nn.Module) -> bool:
    # modules() also finds the head inside DDP, FSDP or a pipeline stage wrapper.
    return any(getattr(sub, _VOCAB_PARALLEL, False) for sub in module.modules())


def loss_context(model: nn.Module | Iterable[nn.Module]) -> contextlib.AbstractContextManager:
    """`loss_parallel()` when `model` (or any of several stage modules) emits vocab-sharded
    DTensor logits, else a no-op. Run the loss's forward and backward inside it."""
    modules = [model] if isinstance(model, nn.Module) else list(model)
    if any(_vocab_sharded(m) for m in modules):
        return loss_parallel()
    return contextlib.nullcontext()


@torch.no_grad()
def grad_sq_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squared gradient entries over `params`, as a plain fp32 scalar tensor.

    DTensor gradients count their global tensor once: Partial placements are
    reduced first, shards are summed across their mesh dims, replicas are not.
    Local sums are batched per (mesh, sharded mesh dims), so there is one
    all-reduce per kind of layout and sharded dim, not per parameter. Every rank
    of a mesh must call this with the same parameters, in the same order and with
    gradients on the same ones (all tp peers of a stage do).
    """
    seen: set[int] = set()
    plain: torch.Tensor | None = None
    groups: dict[tuple, torch.Tensor] = {}
    device = None
    for p in params:
        device = device or p.device
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        g = p.grad
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(placements=[Replicate() if pl.is_partial() else pl
                                               for pl in g.placements])
            local = g.to_local().float().square().sum()
            # Any placement left is Replicate or a shard. Not `is_shard()`: FSDP over a tp
            # shard of the same dim places it _StridedShard, whose is_shard() is False
            # (torch 2.13), and the norm would miss the other dp ranks' pieces.
            key = (g.device_mesh, tuple(not pl.is_replicate() for pl in g.placements))
            groups[key] = groups[key] + local if key in groups else local
        else:
            local = g.float().square().sum()
            plain = local if plain is None else plain + local
    total = plain
    for (mesh, sharded), local in groups.items():
        # Shards add up across their mesh dims; a Replicate dim already holds the
        # whole. (All-reduce per dim ourselves: DTensor would warn on every 2-D mesh.)
        for dim, is_shard in enumerate(sharded):
            if is_shard:
                dist.all_reduce(local, group=mesh.get_group(dim))
        total = local if total is None else total + local.to(total.device)
    if total is None:  # no gradients: zero, on the parameters' device
        return torch.zeros((), dtype=torch.float32, device=device)
    return total
