"""Numpy helpers every adapter shares: stacking per-layer trees and torch Linear layouts.

Our block parameters are stacked along a leading layer axis, and our Dense kernels are
[in..., out...] (heads as their own axes); Hugging Face stores one tensor per layer, and torch
Linear weights as [out, in]. Everything here is a transpose or a reshape, so a round trip gives
back the same numbers bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stack_layers(per_layer: list[Any]) -> Any:
    """[one tree per layer] -> one tree with a leading layer axis on every leaf."""
    first = per_layer[0]
    if isinstance(first, dict):
        return {k: stack_layers([layer[k] for layer in per_layer]) for k in first}
    return np.stack([np.asarray(leaf) for leaf in per_layer])


def unstack_layers(tree: Any, n: int) -> list[Any]:
    """The inverse of `stack_layers`: a tree with a leading axis of n -> n trees (numpy leaves)."""
    if isinstance(tree, dict):
        parts = {k: unstack_layers(v, n) for k, v in tree.items()}
        return [{k: parts[k][i] for k in tree} for i in range(n)]
    leaf = np.asarray(tree)
    return [leaf[i] for i in range(n)]


def kernel_from_linear(weight: np.ndarray, in_shape: tuple[int, ...] = (),
                       out_shape: tuple[int, ...] = ()) -> np.ndarray:
    """A torch Linear weight [out, in] as our kernel [*in_shape, *out_shape] (each defaults to flat)."""
    kernel = np.asarray(weight).T
    return kernel.reshape(*(in_shape or kernel.shape[:1]), *(out_shape or kernel.shape[1:]))


def linear_from_kernel(kernel: np.ndarray, in_axes: int = 1) -> np.ndarray:
    """Our kernel whose first `in_axes` axes are its input as a torch Linear weight [out, in]."""
    kernel = np.asarray(kernel)
    return kernel.reshape(int(np.prod(kernel.shape[:in_axes])), -1).T
