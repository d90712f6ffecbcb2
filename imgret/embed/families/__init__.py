"""Model families, found where they live: one module each in this folder (timm, open_clip, torchvision, ...), each
defining `FAMILIES`, a tuple of `Family`, with its `conf/model/<name>.yaml` files naming it as `family:`. A new family is its
module, its yaml and its test; nothing else names it (imgret/embed/models.py asks the family, never its name)."""
from __future__ import annotations

import sys
from functools import cache

from imgret.embed.families.base import Family
from imgret.errors import allowed, bad_value
from imgret.plugins import found_in
from imgret.embed.options import ModelSettings


@cache
def registry() -> dict[str, Family]:
    return found_in(sys.modules[__name__], "FAMILIES", "model families", skip=("base",))


def family_of(model: ModelSettings) -> Family:
    """The family a model's config names (`model.family`), or one line naming the families there are."""
    name = model.family
    if name not in registry():
        raise bad_value("model.family", name, f"one of {allowed(registry())}")
    return registry()[name]
