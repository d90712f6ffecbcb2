"""The settings of one data source or one method, below the entry points: a frozen mapping of plain values, read as
`options.key` or `options.get(key, default)`. Each source and each method owns its keys (conf/data/<name>.yaml,
conf/method/<name>.yaml) and checks them itself; no stage below the entry points sees Hydra's config."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any, Iterator


class Options(Mapping):
    """Plain values by key, nested mappings as Options too; frozen, hashable by content."""

    def __init__(self, values: Mapping | None = None, **more: Any):
        items = {**(values or {}), **more}
        object.__setattr__(self, "_values", {key: Options(value) if isinstance(value, Mapping) else value
                                            for key, value in items.items()})

    @classmethod
    def of(cls, config) -> "Options":
        """A config section (a DictConfig, a dict) as Options: resolved, interpolations and all."""
        if isinstance(config, Options):
            return config
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(config, DictConfig):
                config = OmegaConf.to_container(config, resolve=True)
        except ImportError:  # omegaconf comes with imgret; a plain dict needs nothing of it
            pass
        return cls(config)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):  # copy and pickle look for hooks before __init__ has run
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no setting {key!r} (settings: {', '.join(self._values)})") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("settings are frozen")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted((key, repr(value)) for key, value in self._values.items())))

    def __repr__(self) -> str:
        return f"Options({self._values!r})"

    def plain(self) -> dict:
        """Nested plain dicts, for JSON."""
        return {key: value.plain() if isinstance(value, Options) else value for key, value in self._values.items()}


@functools.lru_cache(maxsize=1)
def config_defaults() -> Options:
    """conf/config.yaml's own values (as shipped in imgret.conf): the one place a default is written. The settings
    types below the entry points take theirs from here, so a library user's defaults are the command line's."""
    import yaml

    return Options(yaml.safe_load(resources.files("imgret.conf").joinpath("config.yaml").read_text()))


def default_cache_dir() -> str:
    """paths.cache as conf/config.yaml sets it: $IMGRET_CACHE, else .cache/imgret (its interpolation, resolved)."""
    from omegaconf import OmegaConf

    return str(OmegaConf.create({"cache": config_defaults().paths.cache}).cache)
