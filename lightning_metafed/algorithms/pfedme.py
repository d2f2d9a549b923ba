"""pFedMe: personalized federated learning with Moreau envelopes (Dinh, Tran & Nguyen, 2020)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from torch import Tensor, nn

from lightning_metafed._validation import check_int, check_positive
from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.functional.adapt import iterate_adaptation
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.proximal import pfedme_update, proximal_loss

__all__ = ["PFedMe"]

PERSONALIZATIONS = ("moreau", "finetune")


def _check_personalization(value: Any) -> None:
    if value not in PERSONALIZATIONS:
        raise ValueError(f"Expected `personalization` to be one of {PERSONALIZATIONS}, got {value!r}")


class PFedMe(MetaFedModule):
    """pFedMe (Dinh et al., 2020, "Personalized Federated Learning with Moreau Envelopes").

    Each client ``i`` has the personalized model ``θ̂_i(w) = argmin_θ f_i(θ) + λ/2 ‖θ − w‖²`` (the
    proximal point of its loss at the global model ``w``); the global model minimizes the mean of
    the clients' Moreau envelopes. One round (:func:`~lightning_metafed.functional.pfedme_update`):
    from ``w_0 = θ``, ``local_steps`` (``R``) local rounds each solve the inner problem approximately
    with ``inner_steps`` (``K``) steps of ``inner_optimizer`` (its ``lr`` is the paper's personal
    learning rate) and move ``w ← w − η λ (w − θ̂)`` (``η = lr``); the client uploads
    ``β (θ − w_R)`` and server ``SGD(lr=1)`` gives ``θ ← (1 − β) θ + β · mean_i w_R,i``.

    Evaluation: ``pre`` is the global model ``w`` (the paper's "GM"); with
    ``personalization="moreau"`` (default) step ``k`` is ``k`` steps of the same inner problem on the
    client's support set from ``w``, so ``post`` after ``eval_inner_steps = K`` steps is the paper's
    personalized model ("PM"); ``personalization="finetune"`` instead fine-tunes ``w`` with plain
    ``inner_optimizer`` steps on the support loss (the post-adaptation protocol of every other
    algorithm here).

    Args:
        net: the global model; each client's personal model has its architecture (``None``:
            :meth:`~lightning_metafed.MetaFedModule.build_net`).
        inner_optimizer: solves the inner problem (default ``SGD(lr=0.01)``, the paper's personal lr).
        inner_steps: ``K``, steps of the inner problem per local round (``>= 1``).
        lam: ``λ > 0``, the strength of the proximal term.
        lr: ``η > 0``, the local update's learning rate.
        local_steps: ``R``, local rounds per communication round (``>= 1``); also bounds
            ``faults.step_choices``.
        server_beta: ``β > 0``, the paper's server mixing (``1``: the plain average).
        local_batch_size: mini-batch size of each local round (``None``: all local data).
        use_query: local data is support and query (``True``) or the support set only.
        personalization: ``"moreau"`` or ``"finetune"`` (see above).
        eval_inner_steps: personalization steps at evaluation (default ``inner_steps``).

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        inner_steps: int = 5,
        lam: float = 15.0,
        lr: float = 0.005,
        local_steps: int = 20,
        server_beta: float = 1.0,
        local_batch_size: int | None = None,
        use_query: bool = True,
        personalization: Literal["moreau", "finetune"] = "moreau",
        eval_inner_steps: int | None = None,
        **kwargs: Any,
    ):
        check_int("inner_steps", inner_steps, minimum=1)
        check_int("local_steps", local_steps, minimum=1)
        if local_batch_size is not None:
            check_int("local_batch_size", local_batch_size, minimum=1)
        _check_personalization(personalization)
        self.lam = check_positive("lam", lam)
        self.lr = check_positive("lr", lr)
        self.server_beta = check_positive("server_beta", server_beta)
        super().__init__(net=net, inner_steps=inner_steps, eval_inner_steps=eval_inner_steps, **kwargs)
        self.local_steps = local_steps
        self.local_batch_size = local_batch_size
        self.use_query = bool(use_query)
        self.personalization = personalization

    @property
    def personalization(self) -> str:
        """How evaluation personalizes (``"moreau"`` or ``"finetune"``); settable after construction
        (e.g. to test one trained model both ways), recorded in ``hparams`` and so in checkpoints."""
        return self._personalization

    @personalization.setter
    def personalization(self, value: str) -> None:
        _check_personalization(value)
        self._personalization = value
        self.hparams["personalization"] = value

    def local_step_bound(self) -> tuple[str, int] | None:
        return "local_steps", self.local_steps

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        update, aux = pfedme_update(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            personal_steps=self.inner_steps,
            lam=self.lam,
            lr=self.lr,
            local_steps=self.local_steps,
            beta=self.server_beta,
            batch_size=self.local_batch_size,
            use_query=self.use_query,
        )
        return self.prefixed(update), aux

    def adapt_client(self, meta: Mapping[str, Tensor], task: ClientTask, steps: int | None = None) -> Iterator[Params]:
        """``personalization="moreau"``: the parameters after ``0..steps`` steps of the inner problem
        ``f(θ; support) + λ/2 ‖θ − w‖²`` from ``w``; ``"finetune"``: plain fine-tuning."""
        if self.personalization == "finetune":
            yield from super().adapt_client(meta, task, steps)
            return
        w = self.net_params(meta)
        for params, _ in iterate_adaptation(
            proximal_loss(self.functional_loss, w, self.lam), w, task.support_x, task.support_y,
            optimizer=self.inner_optimizer, steps=self.eval_inner_steps if steps is None else steps,
            mask=task.support_mask, first_order=True, **self.adaptation_kwargs(meta),
        ):
            yield params
