"""Model architectures by name: `model.arch` -> a builder of the model from the config.

An architecture plugs in with one line next to its module's import in
tokenizer/models/__init__.py (`register_arch("vqgan", VQGAN.from_config)`); a test or a
downstream package registers its own the same way, and from then on load_config,
build_model and Tokenizer.from_pretrained accept its name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenizer.config import ConfigError

if TYPE_CHECKING:
    from tokenizer.config import Config
    from tokenizer.models.base import TokenizerModel

# cfg -> the model, built from its model and quantizer sections.
ModelBuilder = Callable[["Config"], "TokenizerModel"]

_BUILDERS: dict[str, ModelBuilder] = {}


def register_arch(name: str, builder: ModelBuilder, replace: bool = False) -> None:
    """Make `model.arch: <name>` build with `builder`. Registering a taken name again is
    refused unless `replace` (two modules claiming one name is a bug, not an override)."""
    if not name:
        raise ValueError("an architecture needs a non-empty name")
    if name in _BUILDERS and not replace and _BUILDERS[name] is not builder:
        raise ValueError(f"model.arch {name!r} is already registered (pass replace=True)")
    _BUILDERS[name] = builder


def unregister_arch(name: str) -> None:
    """Forget an architecture (tests that registered one clean up with this)."""
    _BUILDERS.pop(name, None)


def arch_names() -> tuple[str, ...]:
    """Every registered architecture, in registration order."""
    return tuple(_BUILDERS)


def check_arch(name: str) -> None:
    """ConfigError naming the choices unless `name` is a registered architecture."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model.arch {name!r}; choices: {', '.join(_BUILDERS)}")


def build_model(cfg: Config) -> TokenizerModel:
    """The model `cfg.model.arch` names, built from the model and quantizer sections."""
    check_arch(cfg.model.arch)
    return _BUILDERS[cfg.model.arch](cfg)
