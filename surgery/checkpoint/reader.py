"""Lazy checkpoint reader: tensor names, shapes and dtypes without loading; one tensor at a time.

Design
------
* At open time every safetensors file is validated *up front* (missing shard,
  truncated file, corrupt header, offsets that do not tile the data) so that a
  broken checkpoint fails before any work, with a one-line CheckpointError naming
  the file.  The header is parsed by :func:`read_safetensors_header` (8-byte
  little-endian length + JSON) and cross-checked by the real ``safetensors``
  library.
* ``names`` / ``shape`` / ``dtype`` / ``nbytes`` come from the parsed headers:
  no tensor data is touched.
* ``get(name)`` reads exactly that tensor's byte range with an ordinary
  ``readinto`` into a fresh buffer -- *not* through a memory map, because the
  pages of a mapped shard stay resident (and count in RSS) for as long as the map
  is open; reading through ``read`` keeps the process's memory at about one
  tensor regardless of shard or model size.  The bytes are reinterpreted with
  ``Tensor.view(dtype)``: no conversion, so an untouched tensor is byte-identical.
* At most ``_MAX_OPEN`` (2) plain file handles are kept open (LRU).
* Pickled ``pytorch_model*.bin`` files execute code on load in general, so they
  are refused unless ``allow_pickle=True`` (CLI ``--allow-pickle``); then they are
  read with ``torch.load(..., weights_only=True, mmap=True)``, one file at a time.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import CheckpointError

from .files import SAFETENSORS_INDEX, PICKLE_INDEX, _one_line, _read_index, load_config, weight_files

# safetensors dtype string <-> torch dtype (only those torch can represent).
ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _st, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("C64", "complex64"),
):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_st] = getattr(torch, _attr)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_MAX_OPEN = 2


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file (0 for pickled tensors)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors file's header without reading tensor data.

    Returns ``(tensors, metadata, data_start)`` where ``tensors`` maps names to
    :class:`TensorInfo` in file (offset) order.  Raises CheckpointError naming the
    file if it is truncated or its header is corrupt.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"truncated safetensors file ({size} bytes): {path}")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"truncated or corrupt safetensors header in {path} "
                    f"(header claims {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"missing weight file: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {_one_line(e)}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors header in {path}: {_one_line(e)}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors header in {path}: not a JSON object")

    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"corrupt safetensors header in {path}: __metadata__ is not an object")
    items = []
    for name, spec in header.items():
        try:
            dt, shape, (s, e) = spec["dtype"], spec["shape"], spec["data_offsets"]
            shape = tuple(int(d) for d in shape)
            s, e = int(s), int(e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors header in {path}: bad entry for tensor {name}") from None
        if dt not in ST_TO_TORCH:
            raise CheckpointError(f"tensor {name} in {path} has unsupported dtype {dt}")
        dtype = ST_TO_TORCH[dt]
        expected = math.prod(shape) * dtype.itemsize
        if any(d < 0 for d in shape) or e - s != expected or s < 0:
            raise CheckpointError(f"corrupt safetensors header in {path}: offsets of tensor {name} do not match its shape")
        items.append((s, e, name, dtype, shape))
    items.sort(key=lambda t: (t[0], t[1]))
    pos = 0
    for s, e, name, _, _ in items:
        if s != pos:
            raise CheckpointError(f"corrupt safetensors header in {path}: tensor {name} does not start where the previous ends")
        pos = e
    if pos != data_len:
        what = "truncated" if pos > data_len else "corrupt (trailing bytes)"
        raise CheckpointError(f"{what} safetensors file {path}: header describes {pos} data bytes, file holds {data_len}")
    tensors = {
        name: TensorInfo(path, dtype, shape, data_start + s, data_start + e) for s, e, name, dtype, shape in items
    }
    return tensors, {str(k): str(v) for k, v in metadata.items()}, data_start


def _library_check(path: Path) -> None:
    """Let the real safetensors parser confirm the header (cheap: maps, reads nothing)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(f"corrupt safetensors file {path}: {_one_line(e)}") from None


class CheckpointReader:
    """Read a Hugging Face checkpoint folder lazily (see module docstring).

    Use as a context manager (or call :meth:`close`).  Attributes: ``folder``,
    ``names`` (file/index order), ``weight_files``, ``config``, ``format``
    (``"safetensors"`` or ``"pickle"``), ``metadata`` (the first shard's
    ``__metadata__``).
    """

    def __init__(self, folder, allow_pickle: bool = False):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise CheckpointError(f"not a checkpoint folder: {self.folder}")
        self.allow_pickle = allow_pickle
        self.config: dict = load_config(self.folder / "config.json")
        self.weight_files: list[Path] = weight_files(self.folder)
        self._info: dict[str, TensorInfo] = {}
        self._handles: OrderedDict[Path, object] = OrderedDict()
        self._pickle_file: Path | None = None
        self._pickle_sd: dict | None = None
        self.metadata: dict[str, str] = {}
        if self.weight_files[0].suffix == ".safetensors":
            self.format = "safetensors"
            self._open_safetensors()
        else:
            self.format = "pickle"
            self._open_pickle()
        self.names: list[str] = list(self._info)

    # -- opening ---------------------------------------------------------------
    def _open_safetensors(self) -> None:
        index = self.folder / SAFETENSORS_INDEX
        single = len(self.weight_files) == 1 and self.weight_files[0].name == "model.safetensors"
        wmap = _read_index(index) if index.is_file() and not single else None
        for i, path in enumerate(self.weight_files):
            tensors, meta, _ = read_safetensors_header(path)
            _library_check(path)
            if i == 0:
                self.metadata = meta
            for name, info in tensors.items():
                if wmap is not None and wmap.get(name) != path.name:
                    continue  # not part of the model according to the index
                if name in self._info:
                    raise CheckpointError(f"tensor {name} appears in both {self._info[name].file} and {path}")
                self._info[name] = info
        self._check_complete(wmap, index)

    def _check_complete(self, wmap: dict | None, index: Path) -> None:
        """Every tensor the index names was found; the checkpoint is not empty."""
        if wmap is not None:
            for name, shard in wmap.items():
                if name not in self._info:
                    raise CheckpointError(f"tensor {name} listed in {index} is missing from {self.folder / shard}")
        if not self._info:
            raise CheckpointError(f"no tensors in {self.weight_files[0]}")

    def _open_pickle(self) -> None:
        if not self.allow_pickle:
            raise CheckpointError(
                f"{self.weight_files[0]} is a pickled checkpoint, which can run code when loaded; "
                "pass allow_pickle=True (CLI: --allow-pickle) to read it anyway"
            )
        index = self.folder / PICKLE_INDEX
        single = len(self.weight_files) == 1 and self.weight_files[0].name == "pytorch_model.bin"
        wmap = _read_index(index) if index.is_file() and not single else None
        for path in self.weight_files:
            sd = self._load_pickle(path)
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    continue
                if wmap is not None and wmap.get(name) != path.name:
                    continue
                if name in self._info:
                    raise CheckpointError(f"tensor {name} appears in both {self._info[name].file} and {path}")
                if t.dtype not in TORCH_TO_ST:
                    raise CheckpointError(f"tensor {name} in {path} has unsupported dtype {t.dtype}")
                nb = t.numel() * t.element_size()
                self._info[name] = TensorInfo(path, t.dtype, tuple(t.shape), 0, nb)
        self._check_complete(wmap, index)

    def _load_pickle(self, path: Path) -> dict:
        if self._pickle_file == path and self._pickle_sd is not None:
            return self._pickle_sd
        self._pickle_sd = None  # release the previous file's map first
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            try:  # legacy (non-zip) files cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"cannot load pickled checkpoint {path}: {_one_line(e)}") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
        if isinstance(sd.get("state_dict"), dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            sd = sd["state_dict"]
        self._pickle_file, self._pickle_sd = path, sd
        return sd

    # -- queries ---------------------------------------------------------------
    def _get_info(self, name: str) -> TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise CheckpointError(f"no tensor {name} in {self.folder}") from None

    def info(self, name: str) -> TensorInfo:
        return self._get_info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get_info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._get_info(name).dtype

    def nbytes(self, name: str) -> int:
        return self._get_info(name).nbytes

    def file_of(self, name: str) -> Path:
        return self._get_info(name).file

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._info.values())

    def __contains__(self, name) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self._info)

    def __iter__(self):
        return iter(self.names)

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor the caller may modify)."""
        info = self._get_info(name)
        if self.format == "pickle":
            t = self._load_pickle(info.file)[name]
            return t.detach().clone(memory_format=torch.contiguous_format)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            f = self._handle(info.file)
            buf = memoryview(out.numpy())
            f.seek(info.start)
            got = 0
            while got < info.nbytes:
                k = f.readinto(buf[got:])
                if not k:
                    raise CheckpointError(f"unexpected end of file reading tensor {name} from {info.file}")
                got += k
        return out.view(info.dtype).reshape(info.shape)

    def _handle(self, path: Path):
        f = self._handles.get(path)
        if f is not None:
            self._handles.move_to_end(path)
            return f
        while len(self._handles) >= _MAX_OPEN:
            _, old = self._handles.popitem(last=False)
            old.close()
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            raise CheckpointError(f"cannot open {path}: {_one_line(e)}") from None
        self._handles[path] = f
        return f

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._pickle_sd = None
        self._pickle_file = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.folder)!r}, {len(self._info)} tensors, {self.format})"


__all__ = ["CheckpointReader", "TensorInfo", "read_safetensors_header", "ST_TO_TORCH", "TORCH_TO_ST"]
