"""Diagnostics: how much memory a round's autograd graph holds."""

from __future__ import annotations

import torch

__all__ = ["graph_saved_bytes"]


def graph_saved_bytes(output: torch.Tensor) -> int:
    """Bytes of the tensors the autograd graph of ``output`` saves for backward (each storage once).

    This is the memory a round keeps alive until its backward pass, read off the graph itself
    (deterministic, unlike the resident set size): flat in the number of inner steps for first-order
    rules, linear for second-order MAML.
    """
    seen_nodes, seen_storages, total = set(), set(), 0
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # already freed
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    storage = t.untyped_storage()
                    key = (storage.data_ptr(), storage.nbytes())
                    if key not in seen_storages:
                        seen_storages.add(key)
                        total += key[1]
        stack.extend(fn for fn, _ in node.next_functions)
    return total
