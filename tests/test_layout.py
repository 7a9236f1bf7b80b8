"""The package layout holds: no import cycle between modules (imports inside functions count
too), and click only in the command-line packages."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("runtimes", "deco_export", "training")
# Where click may be imported: the `deco` verbs, and training's verbs they mount.
CLI_MODULES = ("deco_export.commands", "training.cli")


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The package's own modules ``name`` imports, at module level or inside functions."""
    here = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    out.add(f"{target}.{alias.name}")
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(name, path, is_pkg, set(known))
             for name, (path, is_pkg) in known.items()}
    assert graph["deco_export.commands.group"], "the import graph came out empty"
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_click_only_in_the_command_line_packages():
    offenders = []
    for name, (path, _) in modules().items():
        if name.startswith(CLI_MODULES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "click" in names:
                offenders.append(name)
    assert offenders == []


def _classes(path: Path) -> list[ast.ClassDef]:
    return [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]


def test_graph_backends_answer_graph_calls_from_the_records():
    """A runtime backend built on the records writes none of the protocol's graph methods:
    `GraphBackend` derives them (a new graph is one record, no backend edit)."""
    from runtimes.graph_backend import GRAPH_METHODS

    found, written = [], []
    for path in sorted((REPO / "runtimes" / "backends").glob("*.py")):
        for cls in _classes(path):
            if "GraphBackend" not in {ast.unparse(b) for b in cls.bases}:
                continue
            found.append(cls.name)
            written += [f"{cls.name}.{f.name}" for f in cls.body
                        if isinstance(f, ast.FunctionDef) and f.name in GRAPH_METHODS]
    assert set(found) >= {"OnnxRuntimeBackend", "OpenVinoBackend", "CoreMLBackend",
                          "TensorRTBackend"}
    assert written == []


# Modules that still spell graph names outside the records (runtimes.graphs) and the exporters
# (deco_export.export): each is the per-graph knowledge it holds. A module not listed here
# reads graph names from the records.
GRAPH_NAMING = {
    "deco_export.flops": "one FLOP formula per graph",
    "deco_export.bench.aggregate": "the bench's stage columns (dit, decoder, text_encoder)",
    "deco_export.bench.report": "the bench's stage columns",
    "deco_export.bench.worker": "the bench's stage columns",
    "deco_export.bench.timing": "the bench's stage totals",
    "deco_export.bench.text": "the DiT's FLOPs with and without its text path",
    "deco_export.bench.availability": "which artifacts a runtime row needs",
    "deco_export.bench.run": "the text encoder, timed as its own stage",
    "deco_export.validate": "the text encoder, gated apart from the sampled graphs",
    "deco_export.validate_text": "the text encoder's artifact, gated by its own recorded outputs",
    "deco_export.commands.sample": 'the "text_encoder" key of an image\'s recorded parameters',
    "deco_export.text_encoders": "the text encoder's record in a checkpoint",
    "deco_export.config": 'the architecture value "dit" (the plain pixel DiT)',
    "training.trainer": "the text encoder's record in a checkpoint",
    "training.distill": "the teacher's text encoder, read from its checkpoint's record",
    "training.cli": 'the "text_encoder" option of a text-to-image training',
    "runtimes.config": 'the architecture values "deco" and "dit"',
    "runtimes.backend": "the capabilities' method names (decoder_cond, decoder_pixel)",
    "runtimes.bundle": 'the stage "dit" of the graphs whose inputs set a size range, and the '
                       "DiT artifact's hash that keys calibrated schedules and solver tables",
    "runtimes.text_encoder": "the text encoder's artifact",
    "runtimes.int8": "the text encoder, whose int8 gate is on its features, not on images",
    "runtimes.backends.tensorrt": "the fused step's DiT slot",
    "runtimes.backends.coreml": "the DiT's enumerated sizes",
}


def test_graph_names_are_spelled_only_where_listed():
    from runtimes.graphs import GRAPH_NAMES

    spelled = set()
    for name, (path, _) in modules().items():
        if name == "runtimes.graphs" or name.startswith("deco_export.export"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in GRAPH_NAMES:
                spelled.add(name)
    assert sorted(spelled - set(GRAPH_NAMING)) == []
    assert sorted(set(GRAPH_NAMING) - spelled) == []  # a module cleaned up leaves the list


def _backend_modules() -> tuple[set[str], set[str]]:
    """(the backend and bench-row names, the modules that may spell them: the catalogue and
    the backends' own modules, each factory's and probe's with its package; a backend module
    may name another backend where its runtime offers it, as ONNX Runtime's providers do)."""
    from runtimes import catalogue

    names, homes = set(), {"runtimes.catalogue"}
    for entry in catalogue.entries().values():
        for target in (entry.factory, entry.probe):
            if isinstance(target, str):
                module = target.partition(":")[0]
                homes |= {module, module.rpartition(".")[0]}
        for row in entry.rows():
            names |= {entry.name, *entry.aliases, row.name, *row.aliases}
    return names, homes


def _checkable_backend_names(names: set[str]) -> set[str]:
    """The backend and bench-row names that mean nothing else: a manifest runtime ("onnx",
    "coreml", "tensorrt"), a library or pip extra ("torch", "onnxruntime", "openvino") or a
    CFG mode ("reference") is spelled for its own reason wherever it is needed."""
    from deco_export.bench.catalogue import CFG_MODES
    from runtimes import catalogue
    from runtimes.bundle import RUNTIMES

    entries = catalogue.entries().values()
    other = {*RUNTIMES, *CFG_MODES, *(lib for e in entries for lib in e.libraries),
             *(e.extra for e in entries if e.extra)}
    return names - other


def test_backends_are_named_only_in_the_catalogue_and_their_modules():
    """A backend is one catalogue entry: no module but the catalogue and the backend's own
    spells its name or its bench rows' (where the name means nothing else), and none
    special-cases one by comparing a backend variable with its name."""
    names, homes = _backend_modules()
    checkable = _checkable_backend_names(names)
    assert {"torch-cuda", "onnxruntime-cpu", "openvino-cpu", "torch-compile", "ort"} <= checkable
    spelled, compared = [], []
    for module, (path, _) in modules().items():
        if module in homes:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in checkable:
                spelled.append(f"{module}: {node.value!r}")
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Constant) and s.value in names for s in sides) and any(
                        "backend" in ast.unparse(s) for s in sides
                        if not isinstance(s, ast.Constant)):
                    compared.append(f"{module}: {ast.unparse(node)}")
    assert spelled == []
    assert compared == []


def test_scripts_name_their_docs_and_protocols_import_no_other_script():
    """scripts/ holds the protocols that regenerate docs tables, scripts/studies/ the one-off
    studies: each names in its docstring the doc it writes or produced, and no protocol
    imports another script, nor does a study (what they share lives in the packages, e.g.
    `deco_export.studies`)."""
    scripts = sorted((REPO / "scripts").rglob("*.py"))
    names = {p.stem for p in scripts}
    undocumented, importing = [], []
    for path in scripts:
        tree = ast.parse(path.read_text())
        if "docs/" not in (ast.get_docstring(tree) or ""):
            undocumented.append(path.relative_to(REPO).as_posix())
        for node in ast.walk(tree):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in names | {"scripts"} for n in imported):
                importing.append(path.relative_to(REPO).as_posix())
    assert undocumented == []
    assert importing == []
