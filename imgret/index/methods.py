"""The search methods, found where they live: every `Method` in the modules of `imgret/index/libraries/` and
`imgret/index/databases/` (one module per library, algorithm or database, with its `conf/method/<name>.yaml`). Every method searches cosine on the
L2-normalised store (inner product, or an ordering equal to it on unit vectors; each says which) and returns
(similarities, gallery rows), best first, with row -1 where an approximate index found fewer than k results.

Nothing here names a method: the report, the study, the demo and the pipeline ask a method for its label, its
parameters, whether it is exact and how to search it.
"""
from __future__ import annotations

from functools import cache
from typing import Mapping

from imgret.errors import allowed, bad_value, whole
from imgret.index import databases, libraries
from imgret.index.base import Method
from imgret.index.params import MethodParams
from imgret.options import Options
from imgret.plugins import found_in


@cache
def registry() -> dict[str, Method]:
    found: dict[str, Method] = found_in(libraries, "METHODS", "methods")
    for name, method in found_in(databases, "METHODS", "methods").items():
        if name in found:
            raise RuntimeError(f"two methods are named {name!r} (a library's and a database's)")
        found[name] = method
    # exact first, then FAISS's (always installed), then the optional libraries; in each, as their modules list them
    return dict(sorted(found.items(), key=lambda item: (not item[1].exact, item[1].module is not None)))


class _Registry(Mapping):
    """METHODS: name -> Method, in the order the report lists them (exact first, then by library)."""

    def __getitem__(self, name: str) -> Method:
        return registry()[name]

    def __iter__(self):
        return iter(registry())

    def __len__(self) -> int:
        return len(registry())


METHODS = _Registry()


class MethodSettings(MethodParams):
    """A method's config section, typed once where a config (or a library caller's mapping) comes in: `name`, a
    registered method; each parameter that method declares (imgret/index/params.py) and no other key; its `levels`.
    Frozen, read by key or attribute; `method` is the registered Method it configures."""

    @classmethod
    def of(cls, section) -> "MethodSettings":
        if isinstance(section, MethodSettings):
            return section
        values = Options.of(section).plain()
        name = values.get("name")
        if name not in METHODS:
            raise bad_value("method", name, f"one of {allowed(METHODS)}")
        declared = {param.name for param in METHODS[name].params}
        for key, value in values.items():
            if key not in declared | {"name", "levels"}:
                raise bad_value(f"method.{key}", value, f"a parameter of method={name}: "
                                f"{', '.join(sorted(declared)) if declared else 'it has none'}")
        return cls(values)

    @property
    def method(self) -> Method:
        return METHODS[self["name"]]

    def replaced(self, **changes) -> "MethodSettings":
        """The same method with these parameters' values changed (checked as any section is)."""
        return MethodSettings.of({**self.plain(), **changes})


def method_label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name


def is_exact(name: str) -> bool:
    return name in METHODS and METHODS[name].exact


def execution_params() -> set[str]:
    """Settings that change how a method computes, never what it returns: not part of a run's name or the study's
    keys."""
    return {key for method in METHODS.values() for key in method.execution_params}


def invalid_combination(settings: MethodSettings | Mapping) -> str | None:
    """Why this sweep point cannot run, for combinations a cross-product sweep produces (nprobe > nlist)."""
    settings = MethodSettings.of(settings)
    return settings.method.unsupported_quantisation(settings) or settings.method.invalid_combination(settings)


def validate_search(settings: MethodSettings | Mapping, k, gallery_size: int | None = None, dim: int | None = None
                    ) -> None:
    """Fail before any extraction or build if the method cannot run: an unknown method, a library that is not
    installed, a parameter out of range. Bounds that depend on the gallery's size or the embedding dimension
    are checked when those are known (None: not yet)."""
    settings = MethodSettings.of(settings)  # a library caller's mapping: converted (and its keys checked) once
    method = settings.method
    if not whole(k, 1, gallery_size):
        raise bad_value("k", k, f"a whole number from 1 to the gallery size ({gallery_size})"
                        if gallery_size else "a whole number >= 1")
    method.library()
    method.check(settings, gallery_size, dim)
    method.check_k(settings, k)


def is_database(name: str) -> bool:
    """Whether a method is a vector database (a folder of an engine's files, perhaps a server), not a library."""
    from imgret.index.databases.base import DatabaseMethod

    return name in METHODS and isinstance(METHODS[name], DatabaseMethod)


def method_order(name: str) -> int:
    """Where the report lists a method (unknown names, from runs of an older imgret, last)."""
    names = list(METHODS)
    return names.index(name) if name in names else len(names)
