"""Backward passes the sweep runs every step, without ``torch.autograd.grad``'s Python preamble.

``torch.autograd.grad`` checks each output's cotangent in Python before it calls the autograd engine (imports,
symbolic-shape comparisons); measured on a 7,510-parameter MLP with torch 2.13, that preamble costs ~20 µs for
one output and ~90 µs for four, as much as the small backward pass itself. The sweep's cotangents are its own
buffers, made with the outputs' shapes and dtypes, and the engine checks shape, dtype and device again in C++
(a mismatch still raises), so :func:`grad` calls the engine directly. Results are the same tensors, bit for bit:
the same engine call with the same arguments. Where torch has no such entry point, or a tensor is a subclass
(``__torch_function__`` dispatch), it calls ``torch.autograd.grad``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

try:
    from torch.autograd.variable import Variable
    _run_backward = Variable._execution_engine.run_backward
except (ImportError, AttributeError):          # pragma: no cover - every torch >= 1.8 has it
    _run_backward = None

__all__ = ["grad"]


def _plain(ts: Sequence[torch.Tensor]) -> bool:
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in ts)


def grad(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
         grad_outputs: Optional[Sequence[torch.Tensor]] = None, *, create_graph: bool = False,
         accumulate: bool = False) -> Optional[tuple]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=create_graph, allow_unused=True)``
    (the graph retained iff ``create_graph``); ``grad_outputs`` None: every output is a scalar, cotangent 1.

    ``accumulate=True`` is ``torch.autograd.backward(outputs, grad_outputs, inputs=inputs)`` instead: the gradients
    are added into the inputs' ``.grad`` and None is returned."""
    outputs, inputs = tuple(outputs), tuple(inputs)
    if grad_outputs is None:
        for o in outputs:
            if o.numel() != 1:
                raise RuntimeError(f"grad can be implicitly created only for scalar outputs, got shape "
                                   f"{tuple(o.shape)}")
        grad_outputs = tuple(torch.ones_like(o) for o in outputs)   # fresh: the engine may keep a root cotangent
    else:
        grad_outputs = tuple(grad_outputs)
        if len(grad_outputs) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs but {len(grad_outputs)} cotangents")
    if _run_backward is None or not (_plain(outputs) and _plain(inputs) and _plain(grad_outputs)):
        if accumulate:
            torch.autograd.backward(outputs, grad_outputs, retain_graph=create_graph, create_graph=create_graph,
                                    inputs=inputs)
            return None
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=create_graph,
                                   create_graph=create_graph, allow_unused=True)
    out = _run_backward(outputs, grad_outputs, create_graph, create_graph, inputs, True, accumulate)
    return None if accumulate else tuple(out)
