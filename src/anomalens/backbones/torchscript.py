"""Read the weights of a TorchScript archive without running TorchScript or arbitrary pickles.

OpenAI's released CLIP files (``ViT-L-14-336px.pt`` and friends, the files the official
AdaptCLIP / AnomalyCLIP code asks for) are TorchScript archives. ``torch.jit.load`` would
compile and load their code, and ``torch.load`` refuses them; this module reads only what a
state dict needs:

* ``<root>/data.pkl`` is unpickled with an allow-list: the ``__torch__.*`` module classes
  become inert attribute holders, tensors are rebuilt with ``torch._utils``' v2 layout from the
  raw ``<root>/data/<key>`` storages, and ``collections.OrderedDict`` is allowed; any other
  global (``os.system``, ``builtins.eval``...) stops the read with an error.
* ``<root>/code/**.py`` is *read as text* for each class's ``__parameters__`` and
  ``__buffers__`` declarations, so that plain tensor attributes (OpenAI's ``attn_mask``) are
  left out exactly as ``torch.jit.load(path).state_dict()`` leaves them out.

The result equals ``torch.jit.load(path, map_location="cpu").state_dict()`` (tested).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

__all__ = ["is_torchscript_archive", "read_torchscript_state_dict"]

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_CLASS = re.compile(r"^class\s+(\w+)\s*\(", re.MULTILINE)
_DECL = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*\[([^\]]*)\]", re.MULTILINE)


def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """True for a zip archive holding TorchScript code (``constants.pkl`` or ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


class _ScriptObject:
    """Stand-in for a ``__torch__`` class instance: keeps its pickled attributes, runs nothing."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(
    storage: torch.Tensor,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._archive, self._root, self._path = archive, root, path
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                cls = type(name, (_ScriptObject,), {"qualified_name": qualified})
                self._classes[qualified] = cls
            return self._classes[qualified]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to load {module}.{name} from the TorchScript archive "
            "(only module attributes and tensors are read)"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._path}: unknown storage type {storage_type!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._root}/data/{key}")
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype)
            if flat.numel() != numel:
                raise pickle.UnpicklingError(
                    f"{self._path}: storage {key} holds {flat.numel()} values, expected {numel}"
                )
            self._storages[key] = flat
        return self._storages[key]


def _declared_state(archive: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """Qualified class name -> names declared in ``__parameters__`` / ``__buffers__``."""
    out: dict[str, set[str]] = {}
    prefix = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix) : -len(".py")].replace("/", ".")
        text = archive.read(name).decode("utf-8", errors="replace")
        heads = list(_CLASS.finditer(text))
        for i, head in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            names: set[str] = set()
            for decl in _DECL.finditer(text, head.end(), end):
                names.update(re.findall(r"[\"'](\w+)[\"']", decl.group(2)))
            out[f"{module}.{head.group(1)}"] = names
    return out


def read_torchscript_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive, as ``torch.jit.load(...).state_dict()``.

    Args:
        path: a TorchScript ``.pt`` archive (e.g. OpenAI's CLIP releases).

    Returns:
        ``{dotted name: tensor}`` on the CPU, dtypes as stored.

    Raises:
        ValueError: not a TorchScript archive, big-endian data, or a pickle that asks for
            anything other than module attributes and tensors.
    """
    path = Path(path)
    if not is_torchscript_archive(path):
        raise ValueError(f"{path} is not a TorchScript archive")
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one <root>/data.pkl in the archive, found {pkls}")
        root = pkls[0].split("/")[0]
        order = f"{root}/byteorder"
        if order in archive.namelist() and archive.read(order).strip() != b"little":
            raise ValueError(f"{path}: big-endian TorchScript archives are not supported")
        declared = _declared_state(archive, root)
        try:
            obj = _Unpickler(archive.read(pkls[0]), archive, root, path).load()
        except pickle.UnpicklingError as exc:
            raise ValueError(str(exc)) from exc
    if not isinstance(obj, _ScriptObject):
        raise ValueError(f"{path}: the archive's data.pkl does not hold a module")
    state: dict[str, torch.Tensor] = {}

    def walk(module: _ScriptObject, prefix: str) -> None:
        keep = declared.get(module.qualified_name)
        for name, value in getattr(module, "attributes", {}).items():
            if isinstance(value, torch.Tensor):
                if keep is None or name in keep:  # undeclared class: every tensor attribute
                    state[prefix + name] = value.clone()
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(obj, "")
    return state
