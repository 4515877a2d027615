"""cdgfast.data: data sets, class-incremental splits, replay buffers and generated replay pools."""
from .buffers import ClassBalancedBuffer, ReplaceWhenFullBuffer, ReservoirBuffer
from .datasets import (DATASET_ALIASES, DATASET_REGISTRY, DATASETS, DatasetInfo, ImageDataset, canonical_dataset,
                       load_dataset, read_idx, train_eval_split)
from .replay import chunk_seed, generate_replay_pool
from .splits import Task, TaskLoader, class_incremental_split, task_loader

__all__ = ["DATASET_REGISTRY", "DATASET_ALIASES", "DATASETS", "DatasetInfo", "canonical_dataset", "ImageDataset",
           "load_dataset", "read_idx", "train_eval_split",
           "Task", "TaskLoader", "class_incremental_split", "task_loader",
           "ReservoirBuffer", "ReplaceWhenFullBuffer", "ClassBalancedBuffer", "generate_replay_pool", "chunk_seed"]
