"""Pure-torch core: inner optimizers, adaptation, client-update rules (meta-learning in ``updates``,
personalization with per-client state in ``personalized``) and aggregation (no Lightning)."""

from lightning_metafed.functional.adapt import adapt, iterate_adaptation, select_params
from lightning_metafed.functional.aggregate import (
    bucket_means,
    clip_to_norm,
    coordinate_median,
    finite_clients,
    noisy_clipped_mean,
    norm_bounded_mean,
    normalize_weights,
    trimmed_mean,
    update_norms,
    weighted_mean,
)
from lightning_metafed.functional.client_task import ClientTask, Params
from lightning_metafed.functional.inner import adam_init, adam_step, sgd_init, sgd_step
from lightning_metafed.functional.losses import (
    accuracy,
    cross_entropy_loss,
    masked_mean,
    mse_loss,
)
from lightning_metafed.functional.personalized import (
    apfl_update,
    ditto_update,
    fedper_update,
    fedrep_update,
    scaffold_server_control,
    scaffold_update,
    split_control,
)
from lightning_metafed.functional.updates import (
    anil_update,
    fedavg_update,
    hvp,
    maml_objective,
    maml_update,
    meta_sgd_update,
    per_fedavg_update,
    reptile_update,
)

__all__ = [
    "ClientTask",
    "Params",
    "accuracy",
    "adam_init",
    "adam_step",
    "adapt",
    "anil_update",
    "apfl_update",
    "bucket_means",
    "clip_to_norm",
    "coordinate_median",
    "cross_entropy_loss",
    "ditto_update",
    "fedavg_update",
    "fedper_update",
    "fedrep_update",
    "finite_clients",
    "hvp",
    "iterate_adaptation",
    "maml_objective",
    "maml_update",
    "masked_mean",
    "meta_sgd_update",
    "mse_loss",
    "noisy_clipped_mean",
    "norm_bounded_mean",
    "normalize_weights",
    "per_fedavg_update",
    "reptile_update",
    "scaffold_server_control",
    "scaffold_update",
    "select_params",
    "sgd_init",
    "sgd_step",
    "split_control",
    "trimmed_mean",
    "update_norms",
    "weighted_mean",
]
