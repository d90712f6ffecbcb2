"""A method's parameters, declared once: each one's name, when it acts (building the index, or searching it), whether
it only changes how the method computes, and its bounds. A method's build, query and execution parameter lists
(which key the index cache, name its runs and make the study's keys) and its one-line refusals are derived from
these declarations; what a declaration cannot say (nprobe at most nlist, a size PostgreSQL reads) stays in the
method's own `check`, after these.
"""
from __future__ import annotations

from dataclasses import dataclass

from imgret.errors import bad_value
from imgret.options import Options

BUILD = "build"  # changes the index: keys the index cache
QUERY = "query"  # applied to a built or loaded index per search
SERVER = "server"  # a setting of the engine's server, neither building nor searching (PostgreSQL's memory)


class MethodParams(Options):
    """A method's section as its engine reads it: the value of each parameter it declares, by key (and its `name`
    and `levels`). Made once, checked against the method's declarations, as `imgret.index.methods.MethodSettings`;
    the engines' code below the registry reads this type, which needs no registry."""


@dataclass(frozen=True)
class Param:
    name: str
    stage: str  # BUILD, QUERY or SERVER
    minimum: float | None = 1  # its smallest value; None: its method checks it (a string, a size, a bound on another)
    execution: bool = False  # changes how the method computes, never what it returns (not in run names or study keys)
    top_level: bool = False  # set as a top-level key (nprobe=16, ef_search=64): its refusal names it so
    optional: bool = False  # null is allowed (its yaml says what null means)
    whole: bool = True  # a whole number; False: any number
    above: bool = False  # the minimum itself is not allowed (a number > minimum)
    maximum: float | None = None
    meaning: str = ""  # what it is, for its refusal

    @property
    def key(self) -> str:
        """How a refusal names it: as the user sets it."""
        return self.name if self.top_level else f"method.{self.name}"

    def allowed(self) -> str:
        """What its refusal says is allowed."""
        words = f"a {'whole number' if self.whole else 'number'} {'>' if self.above else '>='} {self.minimum}"
        words += f" and <= {self.maximum}" if self.maximum is not None else ""
        words += f" ({self.meaning})" if self.meaning else ""
        return words + (", or null" if self.optional else "")

    def fits(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.whole else (int, float)):
            return False
        low = value > self.minimum if self.above else value >= self.minimum
        return low and (self.maximum is None or value <= self.maximum)

    def check(self, opts: MethodParams) -> None:
        value = opts.get(self.name)
        if self.minimum is None or (value is None and self.optional):
            return
        if not self.fits(value):
            raise bad_value(self.key, value, self.allowed())


def names(params: tuple[Param, ...], *stages: str) -> tuple[str, ...]:
    return tuple(param.name for param in params if param.stage in stages)


def hnsw_params(minimum: int = 1) -> tuple[Param, ...]:
    """An HNSW graph's parameters, as every engine that builds one takes them: its degree and its candidate list while
    building (build), and its candidate list while searching (query, set as `ef_search=`). `minimum`: the smallest
    degree and build list the engine accepts."""
    return (Param("hnsw_m", BUILD, minimum), Param("ef_construction", BUILD, minimum),
            Param("ef_search", QUERY, top_level=True))


class HnswGraph:
    """What a method that builds an HNSW graph declares, once for all of them (a mixin before `Method`): the graph's
    parameters, and its search list as the setting the demo and the benchmark vary."""

    params = hnsw_params()
    variant_param = "ef_search"


# The codes a method can keep its rows as, in imgret's words (each method maps them to its engine's own: its
# `quantisations`): full precision, 8-bit scalar, 16-bit float, product-quantised, one bit a dimension.
QUANTISATIONS = ("none", "sq8", "fp16", "pq", "binary")
QUANTISATION = Param("quantisation", BUILD, minimum=None, top_level=True)  # checked against the method's own codes
# re-ranking a quantised index's candidates by the full rows (imgret.index.refine, or an engine's own rescoring)
REFINE = Param("refine_factor", QUERY, optional=True,
               meaning="candidates per result re-ranked by their full rows; 1 or null: none")

