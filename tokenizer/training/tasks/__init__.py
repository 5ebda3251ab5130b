"""Training tasks by name (`train.task`): what one step of the one loop computes."""

from __future__ import annotations

from collections.abc import Callable

from accelerate import Accelerator

from tokenizer.config import Config, ConfigError
from tokenizer.data.shard_specs import resolve_shards
from tokenizer.training.task import TrainingTask
from tokenizer.training.tasks.adversarial import AdversarialTask
from tokenizer.training.tasks.prior import PriorTask, resolve_indexes
from tokenizer.training.tasks.tokenizer import TokenizerTask


def _tokenizer_task(cfg: Config, accelerator: Accelerator) -> TrainingTask:
    """The tokenizer alone, or with loss.adversarial.weight > 0 against a discriminator
    (the VQGAN objective): one task name, as the losses are the config's choice."""
    if cfg.loss.adversarial.weight > 0:
        return AdversarialTask(cfg, accelerator)
    return TokenizerTask(cfg, accelerator)


def _image_shards(cfg: Config) -> tuple[list[str], list[str]]:
    train = resolve_shards(cfg.data.train_shards, "data.train_shards", required=True)
    return train, resolve_shards(cfg.data.eval_shards, "data.eval_shards", required=False)


_BUILDERS: dict[str, Callable[[Config, Accelerator], TrainingTask]] = {
    "tokenizer": _tokenizer_task,
    "prior": PriorTask,
}
# Each task's training and held-out data, resolved and checked before anything is built
# (a missing shard or index stops the run here, naming it).
_DATA: dict[str, Callable[[Config], tuple[list[str], list[str]]]] = {
    "tokenizer": _image_shards,
    "prior": resolve_indexes,
}


def task_names() -> list[str]:
    return list(_BUILDERS)


def resolve_task_data(cfg: Config) -> tuple[list[str], list[str]]:
    """(training, held-out) inputs of cfg.train.task: image shards, or index manifests."""
    _check_task(cfg)
    return _DATA[cfg.train.task](cfg)


def _check_task(cfg: Config) -> None:
    if cfg.train.task not in _BUILDERS:
        raise ConfigError(
            f"train.task: unknown {cfg.train.task!r}; choices: {', '.join(_BUILDERS)}"
        )


def build_task(cfg: Config, accelerator: Accelerator) -> TrainingTask:
    """The task `cfg.train.task` names, its parts built (same seed: same weights per rank)."""
    _check_task(cfg)
    return _BUILDERS[cfg.train.task](cfg, accelerator)
