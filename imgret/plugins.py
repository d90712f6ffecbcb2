"""What a registry of methods, model families or data sources finds: every entry of one named tuple in each module of
a package (one module per method, family or source), by its `name`. Adding one is adding its module and its yaml."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def found_in(package: ModuleType, attribute: str, kind: str, skip: tuple[str, ...] = ()) -> dict:
    """name -> entry for each entry of the tuple `attribute` of every module of `package` but those in `skip`, in
    the modules' alphabetical order; two entries of one name are refused (`kind` names them in the message)."""
    found: dict = {}
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module.name in skip:
            continue
        for entry in getattr(importlib.import_module(f"{package.__name__}.{module.name}"), attribute, ()):
            if entry.name in found:
                raise RuntimeError(f"two {kind} are named {entry.name!r} ({module.name} and another module)")
            found[entry.name] = entry
    return found
