"""A module's weights once per node: one file that every process on the node maps, read-only.

Each Ray Train worker builds the model, frozen towers included. Loaded the usual way, every
worker holds its own copy of each tower in host memory before it moves to its device: eight
copies of a 13 GB LLM on an 8-GPU node, and eight reads of its files. :func:`node_shared_module`
builds a module once per node instead (the first process to take a file lock has a child process
build it and write every parameter and buffer to one safetensors file, renamed into place when
complete; the others wait for the lock);
every process then builds the module's skeleton with its parameters on the meta device and
points them at the file, memory-mapped. The mapped pages are the kernel's page cache of that
file: one copy per node, shared by every process that maps it, whatever their number.

The mapping is private (copy-on-write): a process that wrote to a mapped tensor would get its
own copy of the pages it wrote, never change the file or another process's weights. Frozen
towers are never written. On a GPU the towers move to the device (``Module.to`` makes device
copies); the mapped host tensors are then dropped and the file's pages stay only in the page
cache, which the kernel reclaims as it needs, instead of one anonymous copy per worker.

The file holds the built module's tensors exactly, in their dtypes (a bfloat16 tower is written
in bfloat16, so the mapped pages are what computes), and every buffer, non-persistent ones
included, so the mapped module computes bit for bit what the built one does. Parameters that
the built module shares (a tied LLM input and output embedding) are written once and shared
again when mapped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.errors import QformerError

log = logging.getLogger(__name__)

FORMAT = "qformer-node-weights-1"
"""Written into each file's metadata; a file without it is rebuilt."""

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class NodeWeightsError(QformerError, RuntimeError):
    """A node's weights file does not fit the module it is mapped into."""


def node_shared_module(
    path: Path, build: Callable[[], nn.Module], skeleton: Callable[[], nn.Module]
) -> nn.Module:
    """The module ``build`` makes, its tensors mapped from ``path``, built once per node.

    The first process to need ``path`` builds the module with ``build`` and writes it there;
    the others wait for it. Every process then calls ``skeleton`` with parameters on the meta
    device (buffers are made as usual) and assigns each parameter and buffer a view of the file,
    mapped copy-on-write (see the module's docstring); parameters keep ``requires_grad=False``.
    A file that is truncated, unreadable or of another format is rebuilt.

    ``build`` runs in a process of its own (spawned: it and its arguments must pickle), whose
    memory goes back to the system when it ends; no caller's random generator draws for it.

    Args:
        path: The node-local file (``<key>.safetensors``; a ``.lock`` file goes beside it).
            Its name must change whenever what ``build`` makes would change.
        build: Makes the module with its weights (loaded from a checkpoint); a module-level
            function or a ``functools.partial`` of one.
        skeleton: Makes the same module's structure, without reading weights.

    Returns:
        The skeleton module holding the mapped tensors.

    Raises:
        NodeWeightsError: the file holds other tensors (names, shapes or dtypes) than the
            skeleton has, or the process building it died.
        Exception: whatever ``build`` raised.
    """
    _ensure_file(path, build)
    with torch.random.fork_rng(devices=[]), _parameters_on_meta():
        module = skeleton()
    tensors, aliases = _map_file(path)
    _assign(module, tensors, aliases, path)
    return module


def _map_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a node weights file, as views of its private memory mapping.

    Returns:
        The tensors by name, and the names that alias another (a tied weight) to that name.

    Raises:
        NodeWeightsError: the file is truncated, unreadable or of another format.
    """
    header, data_start = _read_header(path)
    size = path.stat().st_size
    # MAP_PRIVATE: pages are the page cache's until written, then this process's own.
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage)  # (size,) the whole file
    metadata = header.pop("__metadata__")
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        # safetensors orders tensors by alignment, so each starts at a multiple of its item size.
        tensors[name] = data[data_start + start:data_start + end].view(dtype).view(entry["shape"])
    return tensors, json.loads(metadata["aliases"])


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters registered in the block are made on the meta device (no memory, no data);
    buffers as usual. As accelerate's ``init_empty_weights`` does, which GPU machines may lack:
    ``nn.Module.register_parameter`` is patched for the block, in every thread."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _ensure_file(path: Path, build: Callable[[], nn.Module]) -> None:
    """Build and write ``path`` unless a complete file is there, one process at a time."""
    if _is_complete(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(path):
            return
        if path.exists():
            log.warning("%s: incomplete or unreadable, rebuilt", path)
            path.unlink()
        _build_in_child(build, path)


def _build_in_child(build: Callable[[], nn.Module], path: Path) -> None:
    """Run ``build`` and write ``path`` in a new process, and raise what it raised.

    A process that built a tower and freed it keeps much of its memory (the allocator's free
    lists: a third of a bfloat16 SmolLM2 after ``malloc_trim``); a process that exits gives it
    all back. Spawned, not forked: the caller may hold CUDA or Ray's threads.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_build_and_write, args=(build, path, send), name=f"build {path.name}")
    child.start()
    send.close()
    try:
        error = receive.recv()
    except EOFError:  # it died without a word (killed, out of memory)
        error = None
    child.join()
    if error is not None:
        raise error
    if child.exitcode != 0:
        raise NodeWeightsError(f"building {path} failed: its process ended with exit status {child.exitcode}")


def _build_and_write(build: Callable[[], nn.Module], path: Path, send) -> None:
    """The child of :func:`_build_in_child`: build, write, send None or the error raised."""
    try:
        _write(build(), path)
    except Exception as err:  # noqa: BLE001 (sent to the parent, which raises it)
        try:
            send.send(err)
        except Exception:  # noqa: BLE001 (an error that does not pickle)
            send.send(NodeWeightsError(f"building {path}: {err!r}"))
        return
    send.send(None)


def _write(module: nn.Module, path: Path) -> None:
    """Every parameter and buffer of ``module`` (shared ones once) into ``path``, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
        else:
            first_name[id(tensor)] = name
            tensors[name] = tensor.detach().contiguous()
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, staging, metadata={"format": FORMAT, "aliases": json.dumps(aliases)})
        with open(staging, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(staging, 0o644)  # mkstemp's 0600 would hide it from other users' workers
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _is_complete(path: Path) -> bool:
    try:
        _read_header(path)
    except (FileNotFoundError, NodeWeightsError):
        return False
    return True


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` and where its data starts, checked against its size.

    Raises:
        FileNotFoundError: no file.
        NodeWeightsError: a truncated or unreadable file, or another format.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if 8 + length <= size else None
        except (struct.error, ValueError):
            header = None
    metadata = (header or {}).get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise NodeWeightsError(f"{path}: not a complete node weights file ({FORMAT})")
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        raise NodeWeightsError(f"{path}: {size} bytes, its header describes {8 + length + max(ends, default=0)}")
    return header, 8 + length


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str], path: Path) -> None:
    """Point every parameter and buffer of ``module`` at its mapped tensor; aliases share one."""
    parameters: dict[str, nn.Parameter] = {}
    expected: set[str] = set()
    for kind, named in (("_parameters", module.named_parameters(remove_duplicate=False)),
                        ("_buffers", module.named_buffers(remove_duplicate=False))):
        for name, current in list(named):
            source = aliases.get(name, name)
            expected.add(source)
            tensor = tensors.get(source)
            if tensor is None or tensor.shape != current.shape or tensor.dtype != current.dtype:
                found = "absent" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
                raise NodeWeightsError(f"{path}: {name} is {tuple(current.shape)} {current.dtype} in the "
                                       f"module, {found} in the file")
            if kind == "_parameters":
                tensor = parameters.setdefault(source, nn.Parameter(tensor, requires_grad=False))
            owner, _, leaf = name.rpartition(".")
            getattr(module.get_submodule(owner), kind)[leaf] = tensor
    if set(tensors) - expected:
        raise NodeWeightsError(f"{path}: tensors the module lacks, e.g. {sorted(set(tensors) - expected)[:3]}")
