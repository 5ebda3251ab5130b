"""Model architectures by name: `model.arch` -> a builder of the model from the config.

An architecture plugs in with one line next to its module's import in
tokenizer/models/__init__.py (`register_arch("vqgan", VQGAN.from_config, check=...,
release_keys=...)`); a test or a downstream package registers its own the same way, and
from then on load_config, build_model and Tokenizer.from_pretrained accept its name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tokenizer.config import ConfigError

if TYPE_CHECKING:
    from tokenizer.config import Config, ModelConfig
    from tokenizer.models.base import TokenizerModel

# cfg -> the model, built from its model and quantizer sections.
ModelBuilder = Callable[["Config"], "TokenizerModel"]
# cfg -> None, or ConfigError naming the key: what only this architecture rules out
# (the downsampling factor data.resolution must be divisible by, keys it cannot honour).
ConfigCheck = Callable[["Config"], None]
# The model.* keys a release records: fixed, or chosen from the model section (an
# architecture whose blocks are configurable records the keys of the blocks it uses).
ReleaseKeys = tuple[str, ...] | Callable[["ModelConfig"], tuple[str, ...]]


@dataclass(frozen=True)
class Arch:
    builder: ModelBuilder
    check: ConfigCheck | None = None
    # The model.* keys that decide this architecture's weights and codes: a release
    # records these alone, so that keys other architectures read (added later or not)
    # never enter its fingerprint. None: every key of the model section.
    release_keys: ReleaseKeys | None = None


_ARCHS: dict[str, Arch] = {}


def register_arch(
    name: str,
    builder: ModelBuilder,
    replace: bool = False,
    *,
    check: ConfigCheck | None = None,
    release_keys: ReleaseKeys | None = None,
) -> None:
    """Make `model.arch: <name>` build with `builder`; `check` adds the architecture's own
    config rules, `release_keys` names the model keys its releases record. Registering a
    taken name again is refused unless `replace` (two modules claiming one name is a bug,
    not an override)."""
    if not name:
        raise ValueError("an architecture needs a non-empty name")
    keys = release_keys if release_keys is None or callable(release_keys) else tuple(release_keys)
    arch = Arch(builder, check, keys)
    if name in _ARCHS and not replace and _ARCHS[name] != arch:
        raise ValueError(f"model.arch {name!r} is already registered (pass replace=True)")
    _ARCHS[name] = arch


def unregister_arch(name: str) -> None:
    """Forget an architecture (tests that registered one clean up with this)."""
    _ARCHS.pop(name, None)


def arch_names() -> tuple[str, ...]:
    """Every registered architecture, in registration order."""
    return tuple(_ARCHS)


def check_arch(name: str) -> None:
    """ConfigError naming the choices unless `name` is a registered architecture."""
    if name not in _ARCHS:
        raise ConfigError(f"unknown model.arch {name!r}; choices: {', '.join(_ARCHS)}")


def check_arch_config(cfg: Config) -> None:
    """ConfigError unless cfg.model.arch is registered and its own rules accept cfg."""
    check_arch(cfg.model.arch)
    check = _ARCHS[cfg.model.arch].check
    if check is not None:
        check(cfg)


def release_model_config(model: ModelConfig) -> dict[str, Any]:
    """The model section a release records: the keys its architecture names."""
    check_arch(model.arch)
    keys = _ARCHS[model.arch].release_keys
    if callable(keys):
        keys = keys(model)
    values: Mapping[str, Any] = asdict(model)
    return {k: v for k, v in values.items() if keys is None or k in keys}


def build_model(cfg: Config) -> TokenizerModel:
    """The model `cfg.model.arch` names, built from the model and quantizer sections."""
    check_arch(cfg.model.arch)
    return _ARCHS[cfg.model.arch].builder(cfg)
