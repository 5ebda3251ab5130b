"""Training tasks by name (`train.task`): what one step of the one loop computes."""

from __future__ import annotations

from collections.abc import Callable

from accelerate import Accelerator

from tokenizer.config import Config, ConfigError
from tokenizer.training.task import TrainingTask
from tokenizer.training.tasks.adversarial import AdversarialTask
from tokenizer.training.tasks.tokenizer import TokenizerTask


def _tokenizer_task(cfg: Config, accelerator: Accelerator) -> TrainingTask:
    """The tokenizer alone, or with loss.adversarial.weight > 0 against a discriminator
    (the VQGAN objective): one task name, as the losses are the config's choice."""
    if cfg.loss.adversarial.weight > 0:
        return AdversarialTask(cfg, accelerator)
    return TokenizerTask(cfg, accelerator)


_BUILDERS: dict[str, Callable[[Config, Accelerator], TrainingTask]] = {
    "tokenizer": _tokenizer_task,
}


def task_names() -> list[str]:
    return list(_BUILDERS)


def build_task(cfg: Config, accelerator: Accelerator) -> TrainingTask:
    """The task `cfg.train.task` names, its parts built (same seed: same weights per rank)."""
    builder = _BUILDERS.get(cfg.train.task)
    if builder is None:
        raise ConfigError(
            f"train.task: unknown {cfg.train.task!r}; choices: {', '.join(_BUILDERS)}"
        )
    return builder(cfg, accelerator)
