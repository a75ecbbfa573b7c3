"""Configuration: OmegaConf YAML whose keys are constructor arguments, with dotted overrides.

Errors name the file, the bad key and the valid keys, so a typo is a one-line fix.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medsyn.errors import ConfigError


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(mapping: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raise ConfigError if `mapping` has a key outside `valid`; `where` names the section/file."""
    valid = sorted(valid)
    for key in mapping:
        if key not in valid:
            raise ConfigError(
                f"unknown key '{key}' in {where}{_suggest(str(key), valid)}; valid keys: {', '.join(valid)}"
            )


def constructor_keys(cls: type) -> list[str]:
    """The keyword arguments `cls.__init__` accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [
        n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def load_yaml(path: str | os.PathLike) -> DictConfig:
    """Load a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, OSError) as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML ({type(err).__name__}: {err})") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got a {type(cfg).__name__}")
    return cfg


def parse_overrides(dotlist: Sequence[str]) -> DictConfig:
    """Parse `a.b=value` strings (values in YAML syntax) into a config."""
    for item in dotlist:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    try:
        return OmegaConf.from_dotlist(list(dotlist))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(dotlist)}: {err}") from err


def merge_checked(
    base: DictConfig, override: DictConfig | Mapping, where: str, open_keys: Iterable[str] = ()
) -> DictConfig:
    """Merge `override` into `base`, refusing keys that `base` does not have.

    `open_keys` are dotted sections whose contents are checked elsewhere (e.g. a model section
    validated against the constructor's signature), so new keys may be added there.
    """
    open_keys = set(open_keys)

    def walk(b: Any, o: Mapping, prefix: str) -> None:
        for key, value in o.items():
            dotted = f"{prefix}{key}"
            if prefix.rstrip(".") in open_keys:
                continue
            if not isinstance(b, (DictConfig, Mapping)) or key not in b:
                valid = list(b.keys()) if isinstance(b, (DictConfig, Mapping)) else []
                section = prefix.rstrip(".") or "the top level"
                raise ConfigError(
                    f"unknown key '{dotted}' in {where}{_suggest(str(key), valid)}; "
                    f"valid keys under {section}: {', '.join(map(str, valid))}"
                )
            if isinstance(value, (DictConfig, Mapping)) and isinstance(b[key], (DictConfig, Mapping)):
                walk(b[key], value, dotted + ".")

    override = override if isinstance(override, DictConfig) else OmegaConf.create(dict(override))
    walk(base, override, "")
    try:
        return OmegaConf.merge(base, override)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {err}") from err


def to_container(cfg: Any) -> Any:
    """DictConfig/ListConfig -> plain dicts and lists (resolved); other values unchanged."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
