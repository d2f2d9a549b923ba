"""Task data: the ``TaskBatch`` container."""

from lightning_metafed.data.task_batch import TaskBatch

__all__ = ["TaskBatch"]
