"""The `Backend` protocol's graph calls, answered from the graph records.

Every runtime backend that loads graph files (ONNX Runtime, OpenVINO, Core ML, TensorRT) does
the same thing for each call: find the graph that answers it, name the arguments after the
graph's inputs, run it and return one output. The records say all of that
(`runtimes.graphs.GraphSpec.calls`: ``dit`` -> the ``dit`` graph's ``cond``, ``dit_hidden`` ->
its ``hidden``, ``refresh_condition`` -> ``refresh``'s ``cond``, ...), so it is written once,
here: a backend subclasses `GraphBackend`, loads its graphs, calls `bind_graphs` with each
loaded graph's outputs, and implements one method, ``_run(graph, output, feeds)``, which only
translates arrays into its runtime's call. The ``supports_*`` flags follow from what was loaded
(`runtimes.backend.CAPABILITIES`): a capability is offered when every method it promises has a
loaded graph whose output answers it. A new graph is one record; no backend changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runtimes.backend import CAPABILITIES, BackendError
from runtimes.config import ModelConfig
from runtimes.graphs import GRAPH_SPECS, GUIDANCE_INPUT, get_graph

__all__ = ["GRAPH_METHODS", "GraphBackend", "GraphCall"]

# Every Backend method some record answers, in declaration order.
GRAPH_METHODS: tuple[str, ...] = tuple(dict.fromkeys(m for g in GRAPH_SPECS for m, _ in g.calls))


@dataclass(frozen=True)
class GraphCall:
    """One protocol method as a graph run: the graph, its input names (the method's arguments,
    in order) and the output returned."""

    method: str
    graph: str
    inputs: tuple[str, ...]
    output: str


class GraphBackend:
    """The graph methods and ``supports_*`` flags of the `Backend` protocol, derived from the
    graph records of the graphs a backend loaded. Subclasses implement ``_run`` (and the
    array half of the protocol: ``from_numpy``, ``to_numpy``, ``concat``, ``close``)."""

    supports_refresh = False
    supports_decoder_split = False
    supports_text_embedding = False
    supports_velocity = False
    takes_guidance = False
    _graph_calls: Mapping[str, GraphCall] = {}

    def bind_graphs(self, model: ModelConfig, outputs: Mapping[str, Iterable[str]]) -> None:
        """Answer every call whose graph was loaded with the output it returns (``outputs``:
        each loaded graph's output names; a DiT without ``hidden`` answers ``dit`` only), and
        set each capability flag from the calls answered."""
        calls: dict[str, GraphCall] = {}
        for graph, names in outputs.items():
            spec = get_graph(graph, model)
            have = set(names)
            for method, output in spec.calls:
                if output in have:
                    calls[method] = GraphCall(method, graph, spec.input_names, output)
        self._graph_calls = calls
        self.takes_guidance = any(GUIDANCE_INPUT in c.inputs for c in calls.values())
        for flag, methods in CAPABILITIES.items():
            if all(m in GRAPH_METHODS for m in methods):
                setattr(self, flag, all(m in calls for m in methods))

    def answers(self, method: str) -> bool:
        """Whether a loaded graph answers ``method``."""
        return method in self._graph_calls

    def _run(self, graph: str, output: str, feeds: Mapping[str, Any]) -> Any:
        """Run ``graph`` on ``feeds`` (input name -> native array) and return ``output``."""
        raise NotImplementedError(f"{type(self).__name__} runs no graphs")

    def _call(self, method: str, *args: Any) -> Any:
        call = self._graph_calls.get(method)
        if call is None:
            wanted = [g.name for g in GRAPH_SPECS if any(m == method for m, _ in g.calls)]
            raise BackendError(
                f"this bundle has no graph for {method} (the {' / '.join(dict.fromkeys(wanted))} "
                f"graph with the output it returns); export the bundle again with it")
        if len(args) != len(call.inputs):
            raise TypeError(f"{method} takes {len(call.inputs)} arrays "
                            f"({', '.join(call.inputs)}), got {len(args)}")
        return self._run(call.graph, call.output, dict(zip(call.inputs, args, strict=True)))


def _graph_method(method: str) -> Callable[..., Any]:
    def answer(self: GraphBackend, *args: Any) -> Any:
        return self._call(method, *args)

    answer.__name__ = answer.__qualname__ = method
    answer.__doc__ = (f"The protocol's ``{method}``, answered by the loaded graph whose record "
                      f"declares it (see `runtimes.backend`).")
    return answer


for _method in GRAPH_METHODS:
    setattr(GraphBackend, _method, _graph_method(_method))
