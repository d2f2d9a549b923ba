"""Inner (client-side) optimizers as small typed config objects that LightningCLI can build.

Each object holds hyperparameters only; the math is in :mod:`lightning_metafed.functional.inner`.
In YAML::

    model:
      inner_optimizer:
        class_path: lightning_metafed.inner.Adam
        init_args: {lr: 0.01}
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_metafed._validation import ConfigObject, check_range
from lightning_metafed.functional import inner as F

__all__ = ["InnerOptimizer", "SGD", "Adam", "TorchOptimizer"]


def _check_lr(lr: float) -> float:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or lr != lr or lr == float("inf"):
        raise ValueError(f"Expected `lr` to be a finite number > 0, got {lr!r}")
    return float(lr)


def _check_weight_decay(value: float) -> float:
    if not value >= 0 or value == float("inf"):  # also rejects NaN
        raise ValueError(f"Expected `weight_decay` to be a finite number >= 0, got {value!r}")
    return float(value)


class InnerOptimizer(ConfigObject):
    """Base class: a differentiable optimizer the clients use to adapt.

    Subclasses implement :meth:`init` and :meth:`step` as pure functions of dicts of tensors, and
    :meth:`torch_optimizer` for the ``higher`` backend.
    """

    lr: float
    functional: bool = True  # usable by the functional (torch.func) backend

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Any]:
        """The optimizer's state before the first step on ``params`` (e.g. zero momentum buffers)."""
        raise NotImplementedError

    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        state: dict[str, Any],
        lr: F.LearningRate | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """One differentiable step: the new parameters and state from ``grads`` and ``state``, as new
        tensors (never in place). ``lr`` overrides the optimizer's own learning rate (a float, a
        tensor, or a ``{name: rate}`` mapping such as Meta-SGD's learned rates)."""
        raise NotImplementedError

    def torch_optimizer(self, params: Iterable[Tensor]) -> torch.optim.Optimizer:
        """The equivalent ``torch.optim`` optimizer (used by the ``higher`` backend)."""
        raise NotImplementedError


class SGD(InnerOptimizer):
    """Plain or momentum SGD; equals ``torch.optim.SGD`` (dampening 0).

    Args:
        lr: the learning rate (``> 0``).
        momentum: ``μ`` in ``[0, 1)`` (``0``: plain SGD).
        nesterov: use Nesterov momentum (needs ``momentum > 0``).
        weight_decay: the coupled L2 penalty added to the gradient (``>= 0``).

    Example:
        Usually passed to an algorithm (``MAML(net, inner_optimizer=SGD(lr=0.01))``); its steps
        are pure functions of dicts of tensors:

        >>> import torch
        >>> from lightning_metafed.inner import SGD
        >>> opt = SGD(lr=0.1, momentum=0.9)
        >>> params, grads = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.5])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, grads, state)
        >>> params["w"]
        tensor([ 0.9500, -2.0500])
        >>> params, state = opt.step(params, grads, state)  # momentum: the step grows to 0.095
        >>> params["w"]
        tensor([ 0.8550, -2.1450])
    """

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        self.lr = _check_lr(lr)
        self.momentum = check_range("momentum", momentum, 0, 1)
        if nesterov and self.momentum == 0.0:
            raise ValueError(f"Expected `momentum` > 0 when `nesterov=True`, got momentum={momentum!r}")
        self.nesterov = bool(nesterov)
        self.weight_decay = _check_weight_decay(weight_decay)

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Any]:
        return F.sgd_init(params, self.momentum)

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: dict[str, Any], lr: F.LearningRate | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return F.sgd_step(
            params,
            grads,
            state,
            lr=self.lr if lr is None else lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
        )

    def torch_optimizer(self, params: Iterable[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            list(params), lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay
        )


class Adam(InnerOptimizer):
    """Adam; equals ``torch.optim.Adam`` (coupled weight decay, no amsgrad).

    Args:
        lr: the learning rate (``> 0``).
        betas: ``(β1, β2)``, the decay rates of the first and second moment estimates, each in ``[0, 1)``.
        eps: added to the denominator for numerical stability (``> 0``).
        weight_decay: the coupled L2 penalty added to the gradient (``>= 0``).
    """

    def __init__(
        self,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.lr = _check_lr(lr)
        if len(betas) != 2:
            raise ValueError(f"Expected `betas` to be a pair (beta1, beta2), got {betas!r}")
        self.betas = (check_range("betas[0]", betas[0], 0, 1), check_range("betas[1]", betas[1], 0, 1))
        if not eps > 0:
            raise ValueError(f"Expected `eps` > 0, got {eps!r}")
        self.eps = float(eps)
        self.weight_decay = _check_weight_decay(weight_decay)

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Any]:
        return F.adam_init(params)

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: dict[str, Any], lr: F.LearningRate | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return F.adam_step(
            params,
            grads,
            state,
            lr=self.lr if lr is None else lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )

    def torch_optimizer(self, params: Iterable[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(params), lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


class TorchOptimizer(InnerOptimizer):
    """Any ``torch.optim`` optimizer class as the inner optimizer; only with ``inner_backend="higher"``.

    Example: ``TorchOptimizer("torch.optim.RMSprop", lr=0.01, kwargs={"alpha": 0.9})``.

    Args:
        optimizer: the import path of a ``torch.optim.Optimizer`` class.
        lr: the learning rate (``> 0``).
        kwargs: the optimizer's other arguments (``None``: none).
    """

    functional = False

    def __init__(self, optimizer: str = "torch.optim.SGD", lr: float = 0.01, kwargs: dict[str, Any] | None = None):
        self.lr = _check_lr(lr)
        self.optimizer = optimizer
        self.optimizer_class()  # validate now, before any training
        self.kwargs = dict(kwargs or {})

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """The ``torch.optim.Optimizer`` class named by ``optimizer``."""
        module_name, _, cls_name = self.optimizer.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name, None) if module_name else None
        except ImportError:
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(
                f"Expected `optimizer` to be the import path of a torch.optim.Optimizer class "
                f"(e.g. 'torch.optim.RMSprop'), got {self.optimizer!r}"
            )
        return cls

    def torch_optimizer(self, params: Iterable[Tensor]) -> torch.optim.Optimizer:
        return self.optimizer_class()(list(params), lr=self.lr, **self.kwargs)


# Checkpoints store these objects in their hyperparameters; allow torch.load(weights_only=True) to read them.
torch.serialization.add_safe_globals([SGD, Adam, TorchOptimizer])
