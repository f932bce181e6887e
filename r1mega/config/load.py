"""Compose a typed ``R1Config`` from ``conf/`` and Hydra overrides, without starting a Hydra app."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from r1mega.config.errors import ConfigError
from r1mega.config.schema import R1Config
from r1mega.config.store import register_configs

CONFIG_MODULE = "r1mega.conf"
"""The ``conf/`` folder, installed as the package ``r1mega.conf`` (see pyproject.toml)."""


def to_typed(cfg: DictConfig) -> R1Config:
    """Turn a composed Hydra config into typed objects once; runs every group's ``__post_init__``."""
    _reject_unknown_keys(cfg, R1Config, "")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except MissingMandatoryValue as e:  # a required field (a model preset's sizes) that nothing set
        raise ConfigError(e.full_key, None, "a value: the preset in use does not set it (see conf/)") from None
    except Exception as e:  # omegaconf wraps errors raised in __post_init__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def _reject_unknown_keys(cfg: DictConfig, schema: type, prefix: str) -> None:
    """Hydra's ``+key=value`` can add keys a typed config does not have; refuse them here."""
    known = {f.name: f.type for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key == "hydra":
            continue
        if key not in known:
            raise ConfigError(f"{prefix}{key}", cfg[key], f"a key of {schema.__name__} (r1mega/config/schema.py)")
        sub_schema = _DATACLASS_FIELDS.get((schema, key))
        if sub_schema is not None and isinstance(cfg[key], DictConfig):
            _reject_unknown_keys(cfg[key], sub_schema, f"{prefix}{key}.")


_DATACLASS_FIELDS = {
    (R1Config, f.name): f.default_factory
    for f in dataclasses.fields(R1Config)
    if dataclasses.is_dataclass(f.default_factory)
}


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> R1Config:
    """Compose ``conf/<config_name>.yaml`` with overrides into a typed config.

    Raises ``ConfigError`` (one line, names the key) for anything a user can get wrong.
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        key, value, valid = _describe_hydra_error(e)
        value = _override_value(overrides, key, value)
        raise ConfigError(key, value, valid) from None
    return to_typed(cfg)


def _describe_hydra_error(e: Exception) -> tuple:
    """Reduce a Hydra/OmegaConf composition error to (key, value, what is valid)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    missing = re.search(r"Could not find '([\w.]+)/([^']+)'", str(e))
    primary = re.search(r"Cannot find primary config '([^']+)'", str(e))
    if primary:
        return "--config-name", primary.group(1), f"one of {', '.join(available_options(''))}"
    if isinstance(e, MissingConfigException) and missing:
        group, option = missing.groups()
        return group, option, f"one of {', '.join(available_options(group))}"
    err: BaseException | None = e
    while err is not None and not (isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None)):
        err = err.__cause__ or err.__context__
    if err is None:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return "overrides", None, lines[0] if lines else type(e).__name__
    first = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        schema = re.search(r"not in '(\w+)'", first)
        where = schema.group(1) if schema else "its group"
        return err.full_key, getattr(err, "value", None), f"a key of {where} (r1mega/config/schema.py)"
    type_name = re.search(r"converted to (\w+)", first)
    return err.full_key, getattr(err, "value", None), f"a value of type {type_name.group(1)}" if type_name else first


def _override_value(overrides: Sequence[str], key: str, fallback: object) -> object:
    """The value the user wrote for ``key`` on the command line, if any."""
    for item in overrides:
        name, _, value = item.lstrip("+~").partition("=")
        if name == key:
            return value
    return fallback


def available_options(group: str) -> list[str]:
    """Names of the YAML presets in ``conf/<group>/``."""
    from importlib.resources import files

    folder = files(CONFIG_MODULE) / group
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
