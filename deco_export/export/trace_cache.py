"""Traced ONNX graphs, kept so that exporting the same module again skips the tracer.

Tracing a graph with the dynamo exporter (torch.export, decompositions, the ONNX translation)
is most of an export's time: about 13 s per graph of the embedded models on one core, against
a second or two for the parity checks that follow. A checkpoint is often exported more than
once (another precision, another bundle, a re-export after a failed gate, `--force`), and each
time it traces the very same graphs. So `export_onnx_file` keeps what the tracer wrote in
``cache_dir("onnx-traces")``, keyed by everything the traced graph depends on:

- the module: every parameter and buffer (names, dtypes, shapes, bytes), the plain attributes
  of every submodule (sizes, flags, configs), and the packages their classes come from: the
  version of an installed one, every source file of one that is not (this project's own), so
  an edited model is traced again. Left out: what no forward reads, so that the same network
  is traced once however it was loaded: config fields marked ``shapes_graph: False`` (the
  model's native image size) and where transformers read the weights from
  (``name_or_path``);
- the example inputs' dtypes and shapes (not their values: torch.export traces with fake
  tensors, which carry none, so two exports that draw other example values share a trace),
  the input and output names, the dynamic shapes, the opset, and whether weights go to
  external data (then also the file's name, which the graph names its data file by; a
  self-contained graph is the same whatever it is called, so the int8 export, which
  quantizes the fp32 graph, reuses the fp32 trace);
- the versions of torch, onnx and onnxscript.

A hit copies the files into place; nothing else changes, and every export still runs its
parity gate against the PyTorch model, so an entry that were somehow wrong would fail the gate
instead of shipping. Graphs whose files exceed `MAX_ENTRY_BYTES` are not kept (release-size
weights would fill the disk for a trace that costs little next to their conversion), and the
cache keeps its total under `MAX_CACHE_BYTES`, dropping the least recently used entries.

The Core ML exporter keeps its conversions the same way (`deco_export.export.coreml.convert`,
``cache_dir("coreml-conversions")``, through `store_entry` and `stored_entry`): the same key
plus the conversion's settings and coremltools' version; an entry holds the saved package and
the conversion's report. Removing either folder costs only time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from runtimes.cache import cache_dir

CACHE_KIND = "onnx-traces"
MAX_ENTRY_BYTES = 256 * 2**20
MAX_CACHE_BYTES = 2 * 2**30
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "training",
                               "_non_persistent_buffers_set", "_state_dict_hooks",
                               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                               "_load_state_dict_post_hooks", "_forward_hooks",
                               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                               "_backward_hooks", "_backward_pre_hooks",
                               "_is_full_backward_hook", "_compiled_call_impl"})
# Where transformers read a model's weights from: the same weights from another directory
# trace to the same graph.
_NOT_READ_BY_FORWARD = frozenset({"name_or_path"})
_NOT_KEYED = _MODULE_INTERNALS | _NOT_READ_BY_FORWARD


def export_onnx_file(module: torch.nn.Module, inputs: tuple, path: Path, *, opset: int,
                     input_names: list[str], output_names: list[str], dynamic_shapes: Any,
                     external_data: bool) -> None:
    """``torch.onnx.export(module, inputs, dynamo=True, ...)`` saved to ``path`` (plus its
    external-data file), or the same files from the cache when this exact trace was made
    before."""
    def trace() -> None:
        _build_exporter_tables_once()
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
        )
        program.save(str(path), external_data=external_data)

    if too_large_to_keep(module):  # its files would not be kept: hashing them is waste
        trace()
        return
    key = export_key(module, inputs, path, opset=opset, input_names=input_names,
                     output_names=output_names, dynamic_shapes=dynamic_shapes,
                     external_data=external_data)
    cached(key, path, trace)


def _build_exporter_tables_once() -> None:
    """Have the exporter build its tables once per process, not once per graph. Every
    ``torch.onnx.export`` call builds three, the same every time for the installed packages:
    onnxscript's table of ONNX functions (parsing the source of some 500 functions), the
    registry of ATen operators it makes from that table, and the table of decompositions for
    the operators without an ONNX function (torch's default decompositions, filtered). That
    is about 1.3 s of each graph's trace on one core, most of a small graph's. Each call still
    gets its own registry and table (copies of the first), so an exporter that adds custom
    operators to its registry changes no later export. Where the exporter is laid out
    otherwise (another torch), nothing changes."""
    from torch.onnx._internal.exporter import _decomp, _registration

    try:  # a lazily imported module: its name, then the module itself
        apis = importlib.import_module(_registration.onnxscript_apis._name)
    except (AttributeError, ImportError):
        return
    build = getattr(apis, "get_torchlib_ops", None)
    if build is not None and not hasattr(build, "cache_info"):
        apis.get_torchlib_ops = functools.cache(build)
    registry = getattr(_registration, "ONNXRegistry", None)
    from_torchlib = getattr(registry, "from_torchlib", None)
    if from_torchlib is not None and not hasattr(from_torchlib, "built"):
        registry.from_torchlib = _copied_registry(from_torchlib)
    table = getattr(_decomp, "create_onnx_friendly_decomposition_table", None)
    if table is not None and not hasattr(table, "built"):
        _decomp.create_onnx_friendly_decomposition_table = _copied_table(table)


def _copied_registry(from_torchlib: Callable[..., Any]) -> Any:
    """``ONNXRegistry.from_torchlib`` built once per opset; each call returns a copy."""
    built: dict[Any, Any] = {}

    def copy(cls: type, *args: Any, **kwargs: Any) -> Any:
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = from_torchlib.__func__(cls, *args, **kwargs)
        first = built[key]
        registry = cls.__new__(cls)
        registry.__dict__.update(first.__dict__)
        registry.functions = {op: list(metas) for op, metas in first.functions.items()}
        return registry

    copy.built, copy.original = built, from_torchlib.__func__  # type: ignore[attr-defined]
    return classmethod(copy)


def _copied_table(create: Callable[[set[Any]], dict[Any, Any]]) -> Callable[..., Any]:
    """The decomposition table built once per set of operators; each call returns a copy."""
    built: dict[frozenset[Any], dict[Any, Any]] = {}

    def copy(onnx_registered_ops: set[Any]) -> dict[Any, Any]:
        key = frozenset(onnx_registered_ops)
        if key not in built:
            built[key] = create(onnx_registered_ops)
        return dict(built[key])

    copy.built, copy.original = built, create  # type: ignore[attr-defined]
    return copy


def too_large_to_keep(module: torch.nn.Module) -> bool:
    """Whether a module's parameters and buffers alone exceed `MAX_ENTRY_BYTES`: no entry made
    from it would be kept, so its key is not worth computing."""
    return sum(t.numel() * t.element_size()
               for t in (*module.parameters(), *module.buffers())) > MAX_ENTRY_BYTES


def export_key(module: torch.nn.Module, inputs: tuple, path: Path, *, external_data: bool,
               **settings: Any) -> str:
    """The cache key of `export_onnx_file`'s trace: its file's name counts only when the
    weights go to external data, which the graph names its data file by."""
    return trace_key(module, inputs, path.name if external_data else "",
                     external_data=external_data, **settings)


def cached(key: str, path: Path, make: Callable[[], None]) -> bool:
    """Put the files of entry ``key`` at ``path`` (and its companions), making them with
    ``make`` and keeping them when the entry is missing. True when they came from the cache.

    An entry holds one ``.onnx`` file, copied to ``path`` whatever the name it was made
    under, and its companions (external data), copied under their own names: a key that
    allows another name must be of a graph without companions, whose files name none."""
    entry = stored_entry(CACHE_KIND, key)
    if entry is not None:
        try:
            for file in entry.iterdir():  # the graph under the name asked for, its data as is
                shutil.copyfile(file, path if file.suffix == ".onnx" else
                                path.parent / file.name)
            return True
        except OSError:  # removed meanwhile, or unreadable: trace instead
            pass
    make()
    files = [p for p in path.parent.iterdir()
             if p.name == path.name or p.name.startswith(path.name + ".")]

    def write(directory: Path) -> None:
        for file in files:
            shutil.copyfile(file, directory / file.name)

    if sum(p.stat().st_size for p in files) <= MAX_ENTRY_BYTES:
        store_entry(CACHE_KIND, key, write)
    return False


def stored_entry(kind: str, key: str) -> Path | None:
    """The directory of entry ``key`` in ``cache_dir(kind)``, marked recently used; None
    when there is none. An entry is renamed in complete (`store_entry`), so one that exists
    is whole; it may still be evicted by another process while it is read."""
    entry = cache_dir(kind) / key
    try:
        os.utime(entry)  # recently used
    except OSError:
        return None
    return entry


def store_entry(kind: str, key: str, write: Callable[[Path], None]) -> None:
    """Make entry ``key`` of ``cache_dir(kind)`` by ``write(directory)`` into a directory
    beside the cache and rename it in, so a reader never sees half of one; two writers racing
    for one key keep the first. An entry over `MAX_ENTRY_BYTES` is not kept. Failing to cache
    never fails the caller: a cache that cannot be written (read-only, full) is passed over
    in silence; a ``write`` that fails otherwise (a library's save raising its own error) is
    one warning, since the caller's result does not depend on it."""
    root = cache_dir(kind)
    staging = root / f".staging-{uuid.uuid4().hex}"
    try:
        staging.mkdir(parents=True)
        write(staging)
        if _tree_bytes(staging) <= MAX_ENTRY_BYTES:
            try:
                os.rename(staging, root / key)
            except OSError:  # another writer stored it first
                pass
            _evict(root)
    except OSError:
        pass
    except Exception as error:  # whatever a library's writer raises
        warnings.warn(f"not kept in the {kind} cache: {type(error).__name__}: {error}",
                      RuntimeWarning, stacklevel=2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def trace_key(module: torch.nn.Module, inputs: tuple, file_name: str, **settings: Any) -> str:
    """The sha256 of everything a trace of ``module`` on ``inputs`` depends on."""
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else _ADDRESS.sub("", repr(part)).encode()
            h.update(len(data).to_bytes(8, "little") + data)

    add(file_name, sorted((k, _plain(v)) for k, v in settings.items()), torch.__version__,
        *(_version(name) for name in ("onnx", "onnxscript")))
    for x in inputs:
        add(*(str(x.dtype), tuple(x.shape)) if isinstance(x, torch.Tensor) else (x,))
    packages: set[str] = set()
    for name, sub in module.named_modules():
        add(name, f"{type(sub).__module__}.{type(sub).__qualname__}",
            sorted((k, _plain(v)) for k, v in vars(sub).items()
                   if k not in _NOT_KEYED and not isinstance(v, torch.Tensor)))
        packages.add(type(sub).__module__.split(".")[0])
    for package in sorted(packages):
        add(package, _version(package), *_sources(package))
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        add(name, *_tensor_parts(tensor))
    return h.hexdigest()


def _tensor_parts(x: torch.Tensor) -> tuple[object, ...]:
    data = x.detach().cpu().contiguous()
    raw = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
    return str(x.dtype), tuple(x.shape), raw.numpy().tobytes()


def _plain(value: Any) -> Any:
    """What of an attribute can change a trace: plain values as they are, dataclasses (the
    model's config) by their fields that shape the graph, submodules by their class (their own
    state is added apart), anything else by its repr."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                if f.metadata.get("shapes_graph", True)}
    if isinstance(value, torch.nn.Module):
        return type(value).__qualname__
    return value


def _sources(package: str) -> list[bytes]:
    """The source of a package that is not an installed release (this project's own, or any
    checkout installed in development mode): every ``.py`` file under it, so an edit to a
    function a forward calls also changes the key. Released packages count by version."""
    module = sys.modules.get(package)
    file = getattr(module, "__file__", None)
    if not file or {"site-packages", "dist-packages"} & set(Path(file).parts):
        return []
    root = Path(file).parent
    return [p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes()
            for p in sorted(root.rglob("*.py"))]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _evict(root: Path) -> None:
    """Drop the least recently used entries until the cache holds at most MAX_CACHE_BYTES."""
    entries = []
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        size = _tree_bytes(entry)
        entries.append((entry.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= MAX_CACHE_BYTES:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= size


def _tree_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
