"""Pass infrastructure, after torch.fx.passes.infra and MLIR's pass manager.

A pass is a plain function ``(GraphModule | None, CompileState) -> PassResult`` (capture, the first, gets None)
declared with :func:`compiler_pass`, which states its contract:

    requires          facts of the state the pass reads ("layers", "importance", "costs", "masks", ...)
    provides          facts it adds
    changes_costs     it changes shapes, masks or token counts: the manager recomputes every layer's costs
                      after it (``CompileState.refresh_costs``), so no later pass reads stale ones
    invariant         what must still hold after it (checked with ``verify``, see instruments.py):
                      "masked_outputs" — the graph computes what the graph before it computed with every
                      layer's mask applied; "zero_outside_masks" — pruned weights are exactly zero

:class:`PassManager` checks the order when the pipeline is built (a pass whose requirement no earlier pass
provides is a :class:`PipelineError` naming both), then runs the passes, checks every result (a linted
GraphModule) and calls its instruments around each pass — timing, numbered dumps and invariant checks are
instruments (instruments.py), not code inside passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from .state import CompileState

INVARIANTS = ("masked_outputs", "zero_outside_masks")


class PipelineError(RuntimeError):
    """The passes are in an order that cannot work, or a pass broke its contract (a bug, not a user mistake)."""


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool  # the graph changed
    decisions: dict  # JSON-serialisable record of what the pass saw and decided
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> block mask, drawn as heatmaps
    figures: dict[str, Callable] = field(default_factory=dict)  # file stem -> () -> matplotlib Figure


@dataclass(frozen=True)
class PassContract:
    name: str
    requires: frozenset[str]
    provides: frozenset[str]
    changes_costs: bool = False
    invariant: str | None = None


CompilerPass = Callable[[fx.GraphModule | None, CompileState], PassResult]


def compiler_pass(*, requires: Iterable[str] = (), provides: Iterable[str] = (), changes_costs: bool = False,
                  invariant: str | None = None) -> Callable[[CompilerPass], CompilerPass]:
    """Declare a function a compiler pass with its contract (see the module docstring)."""
    if invariant is not None and invariant not in INVARIANTS:
        raise ValueError(f"unknown invariant {invariant!r}; one of {INVARIANTS}")

    def declare(function: CompilerPass) -> CompilerPass:
        function.contract = PassContract(function.__name__, frozenset(requires), frozenset(provides),
                                         changes_costs, invariant)
        return function
    return declare


class PassInstrument:
    """Hooks around every pass; override what you need (see instruments.py)."""

    def before_pass(self, contract: PassContract, gm: fx.GraphModule | None, state: CompileState) -> None:
        pass

    def after_pass(self, contract: PassContract, result: PassResult, seconds: float, state: CompileState) -> None:
        pass


def check_order(passes: Sequence[CompilerPass]) -> list[PassContract]:
    """The passes' contracts; raises PipelineError at the first pass whose requirements are not yet provided."""
    contracts, available = [], set()
    for compiler_pass_ in passes:
        contract = getattr(compiler_pass_, "contract", None)
        if contract is None:
            raise PipelineError(f"{getattr(compiler_pass_, '__name__', compiler_pass_)!r} is not a declared pass "
                                "(decorate it with @compiler_pass(requires=..., provides=...))")
        missing = sorted(contract.requires - available)
        if missing:
            providers = {fact: c.name for c in (getattr(p, "contract", None) for p in passes) if c
                         for fact in c.provides}
            where = "; ".join(f"'{fact}' comes from pass '{providers[fact]}', which must run before it"
                              if fact in providers else f"no pass in the pipeline provides '{fact}'"
                              for fact in missing)
            raise PipelineError(f"pass '{contract.name}' runs too early: it requires {missing} ({where})")
        available |= contract.provides
        contracts.append(contract)
    return contracts


class PassManager:
    def __init__(self, passes: Sequence[CompilerPass], instruments: Sequence[PassInstrument] = ()):
        self.contracts = check_order(passes)
        self.passes = list(passes)
        self.instruments = list(instruments)

    def run(self, state: CompileState) -> fx.GraphModule:
        gm = None
        for compiler_pass_, contract in zip(self.passes, self.contracts):
            for instrument in self.instruments:
                instrument.before_pass(contract, gm, state)
            start = time.perf_counter()
            result = compiler_pass_(gm, state)
            if contract.changes_costs:
                state.refresh_costs()
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult) or not isinstance(result.graph_module, fx.GraphModule):
                raise PipelineError(f"pass {contract.name} must return a PassResult holding a GraphModule")
            result.graph_module.graph.lint()
            for instrument in self.instruments:
                instrument.after_pass(contract, result, seconds, state)
            gm = result.graph_module
        return gm
