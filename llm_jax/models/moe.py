"""Mixture-of-Experts feed-forward: a router sends each token to its top-k experts.

Experts are MLPs whose weights are stacked on an `expert` axis, split over the `expert` mesh
axis (each device of it holds E/ep experts). Routing runs on the global batch under GSPMD, so
the balancing statistics do not depend on the mesh; dispatch, the expert MLPs and combine run
per device inside `shard_map`, where tokens travel to the devices holding their experts by
all-to-all and come back the same way.

Two dispatch modes (`model.moe.capacity_factor`):
- capacity (> 0): in each sequence every expert has C slots; top-1 choices take slots first,
  then top-2, ..., each in token order, and assignments past C are dropped (the residual
  stream carries the token on). One-hot dispatch/combine tensors [B, T, E, C] move tokens by
  einsum: static shapes, cost growing with T * E * C.
- dropless (-1): every (token, expert) pair is kept. Copies are sorted by expert and multiplied
  by a grouped matmul (`lax.ragged_dot`, the blocked and looped forms of
  `models.grouped_mlp`, the Pallas megablox kernel of `models.megablox_mlp` (TPU) or the Mosaic
  GPU kernels of `models.mgpu_mlp`). Across
  devices the copies go in padded buffers of the worst-case size (all of a device's copies to
  one peer), so nothing can overflow.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llm_jax.config.model import ModelConfig
from llm_jax.models import megablox_mlp as megablox
from llm_jax.models import mgpu_mlp as mgpu
from llm_jax.models.grouped_mlp import blocked_mlp, looped_mlp
from llm_jax.models.layers import MLP, activate, param
from llm_jax.parallel.platform import target_platform
from llm_jax.parallel.rules import axis_names, current_mesh, manual_spec

GROUPED_MLPS = {"blocked": blocked_mlp, "looped": looped_mlp, "megablox": megablox.megablox_mlp,
                "ragged_dot_mgpu": mgpu.mgpu_mlp}
# Pallas kernels whose outputs carry no mesh-axis variance: their expert-parallel shard_map runs unchecked.
UNCHECKED_VMA = ("megablox", "ragged_dot_mgpu")
EXPERT_WEIGHT_NAMES = {"up": ("expert", "embed", "mlp"), "gate": ("expert", "embed", "mlp"),
                       "down": ("expert", "mlp", "embed")}


def grouped_matmul(choice: str) -> str:
    """`auto`: `ragged_dot` on TPU, `looped` on CPU, `blocked` elsewhere. XLA lowers ragged_dot
    on CPU and GPU to one dense product per expert over all rows; on an H200 (jax 0.11.2) it
    ran the `mixtral` preset's step 2.8x slower than `blocked`
    (experiments/results/gpu_moe_h200.jsonl). On CPU `looped` skips the blocked form's padding
    and weight copies (docs/moe.md); it has not been measured on a GPU. `megablox` (Pallas, TPU
    only; interpret mode on CPU) and `ragged_dot_mgpu` (Pallas Mosaic GPU, Hopper; interpret
    mode on CPU) are never chosen by `auto` until they are measured."""
    if choice == "megablox":
        megablox.check_platform()  # on GPU: an error now, not at the first trace
    if choice == "ragged_dot_mgpu":
        mgpu.check_platform()  # on TPU: likewise
    if choice != "auto":
        return choice
    backend = target_platform()
    return {"tpu": "ragged_dot", "cpu": "looped"}.get(backend, "blocked")


def route(logits_NE: jax.Array, top_k: int, routing: str, renormalize: bool,
          bias_E: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(experts [N, k] int32, gates [N, k] float32, probabilities [N, E]) from router logits.

    `bias_E` (aux-loss-free balancing) shifts which experts are chosen, never the gates.
    """
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    scores_NE = probs_NE if routing == "softmax_topk" else logits_NE
    if bias_E is not None:
        scores_NE = scores_NE + jax.lax.stop_gradient(bias_E)
    experts_NK = _rowwise_top_k(scores_NE, top_k)
    if routing == "softmax_topk":
        gates_NK = jnp.take_along_axis(probs_NE, experts_NK, axis=-1)
        if renormalize:
            gates_NK = gates_NK / gates_NK.sum(-1, keepdims=True)
    else:
        gates_NK = jax.nn.softmax(jnp.take_along_axis(logits_NE, experts_NK, axis=-1), axis=-1)
    return experts_NK.astype(jnp.int32), gates_NK, probs_NE


def _rowwise_top_k(scores_NE: jax.Array, k: int) -> jax.Array:
    """Indices of each row's k largest scores. Under a mesh the rows stay split like the batch:
    left to the partitioner, top_k gathers every row onto every device, one more collective
    (and device rendezvous) per MoE layer."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return jax.lax.top_k(scores_NE, k)[1]
    spec = manual_spec(("batch", None), scores_NE.shape, mesh)
    return jax.shard_map(lambda s: jax.lax.top_k(s, k)[1], mesh=mesh, in_specs=spec, out_specs=spec)(scores_NE)


def expert_load(experts_NK: jax.Array, num_experts: int) -> jax.Array:
    """[E]: the share of the N*k token-expert assignments that go to each expert (sums to 1)."""
    return jax.nn.one_hot(experts_NK, num_experts, dtype=jnp.float32).mean((0, 1))


def balance_loss(probs_NE: jax.Array, load_E: jax.Array) -> jax.Array:
    """Switch/GShard load-balancing loss E * sum_i f_i * P_i: f_i = `load_E` (`expert_load`), the
    share of assignments to expert i, P_i its mean router probability. 1 when both are uniform;
    gradient through P only."""
    return probs_NE.shape[-1] * jnp.sum(load_E * probs_NE.mean(0))


def router_z_loss(logits_NE: jax.Array) -> jax.Array:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return jnp.mean(jax.nn.logsumexp(logits_NE, axis=-1) ** 2)


def expert_capacity(capacity_factor: float, top_k: int, seq_len: int, num_experts: int) -> int:
    """Slots per expert per sequence: ceil(capacity_factor * top_k * seq_len / num_experts)."""
    return max(1, math.ceil(capacity_factor * top_k * seq_len / num_experts))


def slot_positions(experts_BTK: jax.Array, num_experts: int) -> jax.Array:
    """[B, T, k]: each assignment's place in its expert's queue within its sequence, the top-1
    choices of all tokens queued first, then the top-2 choices, each in token order."""
    B, T, K = experts_BTK.shape
    onehot = jax.nn.one_hot(experts_BTK.transpose(0, 2, 1), num_experts, dtype=jnp.int32)
    onehot = onehot.reshape(B, K * T, num_experts)
    before = jnp.cumsum(onehot, axis=1) - onehot  # earlier assignments to the same expert
    return (before * onehot).sum(-1).reshape(B, K, T).transpose(0, 2, 1)


class Experts(nnx.Module):
    """E MLPs without biases (Mixtral): weights [E, D, F] (up, and gate for SwiGLU) and [E, F, D]."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, kind: str, *, rngs: nnx.Rngs,
                 std: float, out_std: float):
        normal = nnx.initializers.normal
        self.up = param(rngs, normal(std), (num_experts, d_model, d_ff), EXPERT_WEIGHT_NAMES["up"])
        self.gate = (param(rngs, normal(std), (num_experts, d_model, d_ff), EXPERT_WEIGHT_NAMES["gate"])
                     if kind == "swiglu" else None)
        self.down = param(rngs, normal(out_std), (num_experts, d_ff, d_model), EXPERT_WEIGHT_NAMES["down"])

    def weights(self) -> dict[str, jax.Array]:
        out = {"up": self.up[...], "down": self.down[...]}
        if self.gate is not None:
            out["gate"] = self.gate[...]
        return out


class MoE(nnx.Module):
    """Router + experts (+ optional shared experts); returns the output and routing statistics."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, std: float, out_std: float, kind: str | None = None):
        """`kind`: the experts' activation (default model.mlp; BERT passes its exact GELU)."""
        moe = cfg.moe
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.capacity_factor = moe.capacity_factor
        self.routing, self.renormalize, self.jitter = moe.routing, moe.renormalize, moe.router_jitter
        self.kind = kind or cfg.mlp
        self.grouped = grouped_matmul(moe.grouped_matmul)
        self.router = param(rngs, nnx.initializers.normal(std), (cfg.d_model, moe.num_experts), ("embed", "router"))
        # Aux-loss-free balancing: moved by the train step, never by the optimiser (its gradient is zero).
        self.balance_bias = (param(rngs, nnx.initializers.zeros, (moe.num_experts,), ("router",))
                             if moe.bias_update_rate > 0 else None)
        self.experts = Experts(moe.num_experts, cfg.d_model, cfg.expert_ff_dim, self.kind, rngs=rngs,
                               std=std, out_std=out_std)
        self.shared = (MLP(cfg.d_model, moe.num_shared_experts * cfg.expert_ff_dim, self.kind, rngs=rngs, std=std,
                           out_std=out_std, use_bias=False) if moe.num_shared_experts else None)

    def __call__(self, x_BTD: jax.Array, key: jax.Array | None = None,
                 dropless: bool = False) -> tuple[jax.Array, dict]:
        """`dropless` forces dropless dispatch (generation: a cached decode step must not drop)."""
        B, T, D = x_BTD.shape
        x32_ND = x_BTD.reshape(B * T, D).astype(jnp.float32)
        if key is not None and self.jitter > 0:
            x32_ND = x32_ND * jax.random.uniform(key, x32_ND.shape, jnp.float32, 1 - self.jitter, 1 + self.jitter)
        logits_NE = jnp.matmul(x32_ND, self.router[...])  # router in float32 whatever the compute dtype
        bias = self.balance_bias[...] if self.balance_bias is not None else None
        experts_NK, gates_NK, probs_NE = route(logits_NE, self.top_k, self.routing, self.renormalize, bias)
        load_E = expert_load(experts_NK, self.num_experts)
        stats = {"aux_loss": balance_loss(probs_NE, load_E), "z_loss": router_z_loss(logits_NE),
                 "load": load_E, "dropped": jnp.zeros((), jnp.float32)}
        experts_BTK = experts_NK.reshape(B, T, self.top_k)
        gates_BTK = gates_NK.reshape(B, T, self.top_k).astype(x_BTD.dtype)
        weights = self.experts.weights()
        if self.capacity_factor == -1 or dropless:
            # The Pallas kernels declare outputs without mesh-axis variance, which a shard_map that
            # checks variance refuses; unchecked, shard_map's autodiff adds the psums itself.
            y_BTD = expert_parallel(_dropless_local, x_BTD, (experts_BTK, gates_BTK), weights, kind=self.kind,
                                    num_experts=self.num_experts, grouped=self.grouped,
                                    check_vma=self.grouped not in UNCHECKED_VMA)
        else:
            capacity = expert_capacity(self.capacity_factor, self.top_k, T, self.num_experts)
            slots_BTK = slot_positions(experts_BTK, self.num_experts)
            stats["dropped"] = jnp.mean((slots_BTK >= capacity).astype(jnp.float32))
            y_BTD = expert_parallel(_capacity_local, x_BTD, (experts_BTK, gates_BTK, slots_BTK), weights,
                                    kind=self.kind, num_experts=self.num_experts, capacity=capacity)
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        return y_BTD, stats


def expert_parallel(local_fn, x_BTD: jax.Array, routing: tuple, weights: dict, check_vma: bool = True,
                    **static) -> jax.Array:
    """Run `local_fn(x, routing, weights, axes=..., **static)` on each device's tokens.

    Inside an `activation_mesh` of more than one device this is a `shard_map`: tokens and
    routing split like the batch, expert weights as the logical rules place them. Each device
    gathers the weights' fsdp shards, exchanges tokens over the `expert` axis and sums partial
    outputs over the `tensor` axis (the experts' hidden width is split there). `check_vma`:
    `jax.shard_map`'s check of how values vary over the mesh axes.
    """
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return local_fn(x_BTD, routing, weights, axes=MeshAxes(), **static)
    x_spec = manual_spec(("batch", "length", "embed"), x_BTD.shape, mesh)
    routing_specs = tuple(manual_spec(("batch", "length", None), r.shape, mesh) for r in routing)
    w_specs = {k: manual_spec(EXPERT_WEIGHT_NAMES[k], w.shape, mesh) for k, w in weights.items()}
    axes = MeshAxes.from_specs(w_specs, mesh)
    fn = jax.shard_map(partial(local_fn, axes=axes, **static), mesh=mesh,
                       in_specs=(x_spec, routing_specs, w_specs), out_specs=x_spec, check_vma=check_vma)
    return fn(x_BTD, routing, weights)


class MeshAxes:
    """Which mesh axes split the expert weights: `expert` (E), `gather` per weight and dim (the
    fsdp shards to all-gather), `tensor` (the hidden width: partial sums to add up)."""

    def __init__(self, expert: tuple[str, ...] | None = None, ep: int = 1, gather: dict | None = None,
                 tensor: tuple[str, ...] = ()):
        self.expert, self.ep, self.gather, self.tensor = expert, ep, gather or {}, tensor

    @staticmethod
    def from_specs(w_specs: dict[str, P], mesh) -> MeshAxes:
        # The model dim D (up/gate dim 1, down dim 2) is gathered; the hidden dim F stays
        # split and the partial outputs are summed at the end.
        embed_dim = {"up": 1, "gate": 1, "down": 2}
        gather = {k: {embed_dim[k]: axis_names(spec[embed_dim[k]])} for k, spec in w_specs.items()
                  if axis_names(spec[embed_dim[k]])}
        expert_axes = axis_names(w_specs["up"][0])
        ep = math.prod(mesh.shape[a] for a in expert_axes)
        return MeshAxes(expert_axes if ep > 1 else None, ep, gather, axis_names(w_specs["up"][2]))


def _local_weights(weights: dict, axes: MeshAxes, dtype) -> dict:
    out = {}
    for k, w in weights.items():
        for dim, names in axes.gather.get(k, {}).items():
            w = jax.lax.all_gather(w, names, axis=dim, tiled=True)
        out[k] = w.astype(dtype)
    return out


def _expert_mlp(kind: str, w: dict, x: jax.Array, group_sizes: jax.Array | None = None,
                grouped: str = "ragged_dot") -> jax.Array:
    """The experts' MLPs: x [E, M, D] by batched matmul, or rows [M, D] sorted by expert with
    `group_sizes` [E] (rows past their sum are ignored) by grouped matmul: `ragged_dot`,
    `blocked` or `looped` (`models.grouped_mlp`), `megablox` (`models.megablox_mlp`) or
    `ragged_dot_mgpu` (`models.mgpu_mlp`)."""
    if group_sizes is not None and grouped in GROUPED_MLPS:
        return GROUPED_MLPS[grouped](kind, w, x, group_sizes)
    if group_sizes is None:
        def mm(a, b):
            return jnp.einsum("emd,edf->emf", a, b)
    else:
        def mm(a, b):
            return jax.lax.ragged_dot(a, b, group_sizes)
    gate = mm(x, w["gate"]) if "gate" in w else None
    return mm(activate(kind, mm(x, w["up"]), gate), w["down"])


def _finish(y_BTD: jax.Array, axes: MeshAxes) -> jax.Array:
    return jax.lax.psum(y_BTD, axes.tensor) if axes.tensor else y_BTD


def _capacity_local(x_BTD, routing, weights, *, axes: MeshAxes, kind: str, num_experts: int,
                    capacity: int) -> jax.Array:
    experts_BTK, gates_BTK, slots_BTK = routing
    dtype = x_BTD.dtype
    w = _local_weights(weights, axes, dtype)
    # one_hot of a slot >= capacity is all zeros: a dropped assignment dispatches nothing.
    assign_BTKEC = (jax.nn.one_hot(experts_BTK, num_experts, dtype=dtype)[..., None]
                    * jax.nn.one_hot(slots_BTK, capacity, dtype=dtype)[..., None, :])
    dispatch_BTEC = assign_BTKEC.sum(2)
    combine_BTEC = (assign_BTKEC * gates_BTK[..., None, None]).sum(2)
    x_EBCD = jnp.einsum("btec,btd->ebcd", dispatch_BTEC, x_BTD)
    if axes.expert:  # [E, B, C, D] -> this device's experts' slots from every peer [E/ep, ep*B, C, D]
        x_EBCD = jax.lax.all_to_all(x_EBCD, axes.expert, split_axis=0, concat_axis=1, tiled=True)
    E, B, C, D = x_EBCD.shape
    y_EBCD = _expert_mlp(kind, w, x_EBCD.reshape(E, B * C, D)).reshape(E, B, C, D)
    if axes.expert:
        y_EBCD = jax.lax.all_to_all(y_EBCD, axes.expert, split_axis=1, concat_axis=0, tiled=True)
    return _finish(jnp.einsum("btec,ebcd->btd", combine_BTEC, y_EBCD), axes)


def _inverse_permutation(order: jax.Array) -> jax.Array:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _dropless_local(x_BTD, routing, weights, *, axes: MeshAxes, kind: str, num_experts: int,
                    grouped: str) -> jax.Array:
    experts_BTK, gates_BTK = routing
    B, T, D = x_BTD.shape
    K = experts_BTK.shape[-1]
    w = _local_weights(weights, axes, x_BTD.dtype)
    experts_A = experts_BTK.reshape(-1)  # A = B*T*K assignments; assignment a is token a // K
    order_A = jnp.argsort(experts_A, stable=True)
    sorted_experts_A = experts_A[order_A]
    rows_AD = x_BTD.reshape(B * T, D)[order_A // K]
    if axes.expert:
        out_AD = _exchange_and_compute(rows_AD, sorted_experts_A, w, axes, kind, num_experts, grouped)
    else:
        sizes_E = jnp.bincount(experts_A, length=num_experts).astype(jnp.int32)
        out_AD = _expert_mlp(kind, w, rows_AD, sizes_E, grouped)
    y_AD = out_AD[_inverse_permutation(order_A)]
    y_BTD = (y_AD.reshape(B, T, K, D) * gates_BTK[..., None]).sum(2)
    return _finish(y_BTD, axes)


def _exchange_and_compute(rows_AD, sorted_experts_A, w, axes: MeshAxes, kind: str, num_experts: int,
                          grouped: str):
    """Send each copy (sorted by expert) to the device holding its expert, run the local experts
    on what arrives, and bring the results back into the same order.

    Buffers are [ep, A, D]: a device may send all its A copies to one peer, so each peer's
    buffer has room for A rows; unused rows carry the local-expert id `E/ep`, sorted last.
    """
    A, D = rows_AD.shape
    ep = axes.ep
    local = num_experts // ep
    dest_A = sorted_experts_A // local
    counts_P = jnp.bincount(dest_A, length=ep)
    starts_P = jnp.cumsum(counts_P) - counts_P
    slot_A = jnp.arange(A)
    source_PA = jnp.minimum(starts_P[:, None] + slot_A[None, :], A - 1)
    valid_PA = slot_A[None, :] < counts_P[:, None]
    send_PAD = jnp.where(valid_PA[..., None], rows_AD[source_PA], 0).astype(rows_AD.dtype)
    send_ids_PA = jnp.where(valid_PA, sorted_experts_A[source_PA] - jnp.arange(ep)[:, None] * local, local)
    recv_PAD = jax.lax.all_to_all(send_PAD, axes.expert, 0, 0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids_PA, axes.expert, 0, 0, tiled=True).reshape(-1)
    order = jnp.argsort(recv_ids, stable=True)
    sizes = jnp.bincount(recv_ids, length=local).astype(jnp.int32)  # padding (id `local`) is not counted
    out = _expert_mlp(kind, w, recv_PAD.reshape(-1, D)[order], sizes, grouped)
    back_PAD = out[_inverse_permutation(order)].reshape(ep, A, D)
    back_PAD = jax.lax.all_to_all(back_PAD, axes.expert, 0, 0, tiled=True)
    return back_PAD[dest_A, slot_A - starts_P[dest_A]]
