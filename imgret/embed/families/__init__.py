"""Model families, found where they live: one module each in this folder (timm, open_clip, torchvision, ...), each
defining `FAMILY`, a `Family`, with its `conf/model/<name>.yaml` files naming it as `family:`. A new family is its
module, its yaml and its test; nothing else names it (imgret/embed/models.py asks the family, never its name)."""
from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from imgret.embed.families.base import Family
from imgret.errors import allowed, bad_value


@cache
def registry() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name == "base":
            continue
        family = getattr(importlib.import_module(f"{__name__}.{module.name}"), "FAMILY", None)
        if family is not None:
            if family.name in found:
                raise RuntimeError(f"two model families are named {family.name!r} ({module.name} and another module)")
            found[family.name] = family
    return found


def family_of(model_cfg) -> Family:
    """The family a model's config names (`model.family`), or one line naming the families there are."""
    name = model_cfg.get("family")
    if name not in registry():
        raise bad_value("model.family", name, f"one of {allowed(registry())}")
    return registry()[name]
