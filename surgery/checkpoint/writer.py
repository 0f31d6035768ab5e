"""Atomic, sharded, streaming checkpoint writer, and :func:`stream_rewrite`.

Design
------
* **Plan first.**  The caller declares every tensor ``(name, dtype, shape)``
  before writing any.  From the plan the writer fixes the shard layout (greedy in
  plan order under ``max_shard_bytes``; a tensor larger than the budget gets a
  shard of its own) and each shard's complete safetensors header: JSON with
  ``dtype``/``shape``/``data_offsets`` and a string-valued ``__metadata__``,
  space-padded to a multiple of 8 bytes, preceded by its length as an 8-byte
  little-endian integer.  Inside a shard tensors are ordered by element size
  (largest first, as the safetensors library does) so every tensor starts at an
  offset aligned to its element size.
* **Stream.**  ``write(name, tensor)`` puts the tensor's raw bytes
  (``tensor.contiguous().view(torch.uint8)``, no dtype conversion) straight at its
  precomputed position with ``pwrite``.  Peak memory is therefore about one
  tensor, never one shard or one model.  Writes may come in any order.
* **Atomic.**  Everything goes to a sibling temp folder ``.NAME.tmp-XXXX`` (same
  filesystem).  On clean exit the writer checks every planned tensor was written,
  fsyncs, writes ``model.safetensors.index.json`` (always, even for one shard) and
  renames the temp folder to ``out_dir``; with ``overwrite=True`` the old folder
  is renamed aside first and deleted only after the new one is in place (an
  exception or a signal between the two renames puts it back).  On any
  exception the temp folder is removed and ``out_dir`` is untouched.  An existing
  ``out_dir`` without ``overwrite`` fails in the constructor, before any work.
* Callers put aux files (config, tokenizer, manifest) into ``w.tmp_dir`` before
  the ``with`` block ends; they are committed together with the shards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from surgery.errors import CheckpointError

from .files import SAFETENSORS_INDEX, _one_line
from .reader import TORCH_TO_ST

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
_MAX_OPEN = 4
_PWRITE_CHUNK = 1 << 30  # Linux caps a single write at ~2 GiB


@dataclass
class _Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    offset: int = 0  # absolute position in the shard file
    written: bool = False


def shard_name(i: int, n: int) -> str:
    """transformers' shard naming: ``model-00001-of-00003.safetensors`` (1-based)."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def build_header(entries: Sequence[tuple[str, str, Sequence[int], int, int]], metadata: dict[str, str] | None) -> bytes:
    """Serialized safetensors header (length prefix + padded JSON).

    ``entries`` are ``(name, dtype_str, shape, start, end)`` with offsets
    relative to the start of the data section.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, dt, shape, s, e in entries:
        header[name] = {"dtype": dt, "shape": [int(d) for d in shape], "data_offsets": [int(s), int(e)]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


#: files that mark a folder as an earlier surgery output, which ``--overwrite`` may replace
OUTPUT_MARKERS = ("surgery.json", "tune.json")


class CheckpointWriter:
    """Write a sharded safetensors checkpoint atomically (see module docstring)."""

    def __init__(
        self,
        out_dir,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
        fsync: bool = True,
    ):
        self.out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
        self.check_target(self.out_dir, overwrite, max_shard_bytes=max_shard_bytes)
        self.max_shard_bytes = int(max_shard_bytes)
        self.overwrite = overwrite
        self.fsync = fsync
        meta = {"format": "pt"} if metadata is None else dict(metadata)
        meta.setdefault("format", "pt")  # transformers refuses shards without it
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise CheckpointError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
        self.metadata = meta
        self._tmp: Path | None = None
        self._slots: dict[str, _Slot] | None = None
        self._shard_headers: list[bytes] = []
        self._shard_sizes: list[int] = []
        self._created: set[int] = set()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._done = False
        #: callables run with the temporary folder once shards and index are final,
        #: just before the rename (e.g. writing a manifest that hashes every file).
        self.finalizers: list = []

    # -- target checks ---------------------------------------------------------
    @staticmethod
    def check_target(out_dir, overwrite: bool = False, inputs: Iterable = (),
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        """Raise CheckpointError now if writing to ``out_dir`` is bound to fail, or
        would change an input: ``inputs`` (paths or other sources; those that are
        not local paths are skipped) must not be ``out_dir`` or lie inside it, since
        replacing it with ``overwrite`` would delete them, and ``out_dir`` must not
        lie inside an input folder; its parent must be a folder that can be
        created and written; ``max_shard_bytes`` must be at least one byte."""
        from .files import check_folder_inputs, check_parent

        out = Path(out_dir).expanduser()
        if int(max_shard_bytes) <= 0:
            raise CheckpointError(f"output folder {out_dir}: the shard size must be at least one byte, got "
                                  f"{max_shard_bytes!r} bytes")
        check_folder_inputs(out, inputs, overwrite)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise CheckpointError(f"output folder exists: {out}")
            if not out.is_dir() or out.is_symlink():
                raise CheckpointError(f"output path exists and is not a folder: {out}")
            if any(out.iterdir()) and not any((out / m).is_file() for m in OUTPUT_MARKERS):
                raise CheckpointError(f"output folder {out} is not an earlier surgery output (it has no "
                                      f"{' or '.join(OUTPUT_MARKERS)}): --overwrite replaces only those; "
                                      "empty it yourself or write to another folder")
        check_parent("output folder", out)

    # -- lifetime --------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        self._ensure_tmp()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise
        return False

    def _ensure_tmp(self) -> Path:
        if self._done:
            raise CheckpointError(f"writer for {self.out_dir} is already finished")
        if self._tmp is None:
            parent = self.out_dir.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
                self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=parent))
                # mkdtemp makes the folder private (0700); the output is an ordinary folder
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self._tmp, 0o777 & ~umask)
            except OSError as e:
                raise CheckpointError(f"cannot create a temporary folder next to {self.out_dir}: {_one_line(e)}") from None
        return self._tmp

    @property
    def tmp_dir(self) -> Path:
        """The temporary folder that becomes ``out_dir`` at commit."""
        return self._ensure_tmp()

    # -- planning --------------------------------------------------------------
    def plan(self, specs: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> None:
        """Declare every tensor ``(name, dtype, shape)``; fixes shards and headers."""
        if self._slots is not None:
            raise CheckpointError(f"plan() called twice for {self.out_dir}")
        self._ensure_tmp()
        slots: dict[str, _Slot] = {}
        for spec in specs:
            try:
                name, dtype, shape = spec
            except (TypeError, ValueError):
                raise CheckpointError(f"plan entries must be (name, dtype, shape), got {spec!r}") from None
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"tensor names must be non-empty strings, got {name!r}")
            if name in slots:
                raise CheckpointError(f"tensor {name} planned twice")
            if name == "__metadata__":
                raise CheckpointError("'__metadata__' is reserved and cannot be a tensor name")
            if dtype not in TORCH_TO_ST:
                raise CheckpointError(f"tensor {name} has a dtype safetensors cannot store: {dtype}")
            shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise CheckpointError(f"tensor {name} has a negative dimension: {shape}")
            slots[name] = _Slot(name, dtype, shape, math.prod(shape) * dtype.itemsize)
        if not slots:
            raise CheckpointError(f"nothing to write to {self.out_dir}: the plan is empty")

        # greedy shard assignment in plan order
        shards: list[list[_Slot]] = [[]]
        used = 0
        for slot in slots.values():
            if shards[-1] and used + slot.nbytes > self.max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(slot)
            used += slot.nbytes

        for i, members in enumerate(shards):
            # largest element size first -> every tensor is aligned to its element size
            ordered = sorted(members, key=lambda s: -s.dtype.itemsize)  # stable
            entries, pos = [], 0
            for s in ordered:
                entries.append((s.name, TORCH_TO_ST[s.dtype], s.shape, pos, pos + s.nbytes))
                pos += s.nbytes
            header = build_header(entries, self.metadata)
            base = len(header)
            for s, (_, _, _, start, _) in zip(ordered, entries):
                s.shard, s.offset = i, base + start
            self._shard_headers.append(header)
            self._shard_sizes.append(base + pos)
        self._slots = slots

    @property
    def shard_files(self) -> list[str]:
        n = len(self._shard_headers)
        return [shard_name(i, n) for i in range(n)]

    @property
    def planned(self) -> list[str]:
        return list(self._slots or ())

    # -- writing ---------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor's bytes at its place (any order, once each)."""
        if self._slots is None:
            raise CheckpointError(f"write({name}) before plan() for {self.out_dir}")
        slot = self._slots.get(name)
        if slot is None:
            raise CheckpointError(f"tensor {name} was not planned")
        if slot.written:
            raise CheckpointError(f"tensor {name} written twice")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"tensor {name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise CheckpointError(
                f"tensor {name} does not match its plan: got {tensor.dtype} {tuple(tensor.shape)}, "
                f"planned {slot.dtype} {slot.shape}"
            )
        if slot.nbytes:
            t = tensor.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if t.is_conj():
                t = t.resolve_conj()
            if t.is_neg():
                t = t.resolve_neg()
            t = t.contiguous().reshape(-1).view(torch.uint8)
            self._pwrite(slot.shard, memoryview(t.numpy()), slot.offset)
        slot.written = True

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        while len(self._fds) >= _MAX_OPEN:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        path = self._tmp / self.shard_files[shard]
        try:
            if shard not in self._created:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
                self._created.add(shard)
                self._write_all(fd, memoryview(self._shard_headers[shard]), 0)
                os.ftruncate(fd, self._shard_sizes[shard])
            else:
                fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {_one_line(e)}") from None
        self._fds[shard] = fd
        return fd

    def _pwrite(self, shard: int, data: memoryview, offset: int) -> None:
        fd = self._fd(shard)
        try:
            self._write_all(fd, data, offset)
        except OSError as e:
            raise CheckpointError(f"cannot write {self._tmp / self.shard_files[shard]}: {_one_line(e)}") from None

    @staticmethod
    def _write_all(fd: int, data: memoryview, offset: int) -> None:
        done, n = 0, len(data)
        while done < n:
            chunk = data[done : done + _PWRITE_CHUNK]
            if hasattr(os, "pwrite"):
                k = os.pwrite(fd, chunk, offset + done)
            else:  # pragma: no cover - Windows
                os.lseek(fd, offset + done, os.SEEK_SET)
                k = os.write(fd, chunk)
            if k <= 0:
                raise OSError("short write")
            done += k

    def _close_fds(self) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            try:
                os.close(fd)
            except OSError:
                pass

    # -- commit / abort --------------------------------------------------------
    def commit(self) -> Path:
        """Finalize shards and index, then move the folder into place.  Returns ``out_dir``."""
        if self._slots is None:
            raise CheckpointError(f"nothing was planned for {self.out_dir}")
        missing = [s.name for s in self._slots.values() if not s.written]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"tensor {missing[0]} was planned but never written{more}")
        tmp = self._tmp
        files = self.shard_files
        try:
            for i in range(len(files)):
                fd = self._fd(i)  # creates empty-tensor-only shards too
                if self.fsync:
                    os.fsync(fd)
            self._close_fds()
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self._slots.values())},
                "weight_map": {n: files[self._slots[n].shard] for n in sorted(self._slots)},
            }
            idx = tmp / SAFETENSORS_INDEX
            with open(idx, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise CheckpointError(f"cannot finalize {tmp}: {_one_line(e)}") from None
        for fn in self.finalizers:
            fn(tmp)

        out = self.out_dir
        move_into_place(tmp, out, self.overwrite)
        self._tmp = None
        self._done = True
        if self.fsync and hasattr(os, "O_DIRECTORY"):
            try:
                dfd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
        return out

    def abort(self) -> None:
        """Drop everything written so far; ``out_dir`` is left as it was."""
        self._close_fds()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._done = True


def move_into_place(tmp: Path, out: Path, overwrite: bool = False) -> None:
    """Rename the finished temporary folder ``tmp`` (a sibling of ``out``) to
    ``out``.  An existing ``out`` (checked again with
    :meth:`CheckpointWriter.check_target`: it may have appeared meanwhile) is
    renamed aside first and deleted once the new folder is in place; an error or a
    signal (Ctrl-C, SIGTERM as SystemExit) between the two renames puts it back,
    so ``out`` is never left missing."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        CheckpointWriter.check_target(out, overwrite)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    step = f"move the existing {out} aside"
    try:
        if old is not None:
            os.rename(out, old)
        step = f"move {tmp} to {out}"
        os.rename(tmp, out)
    except BaseException as e:
        if old is not None and os.path.lexists(old) and not os.path.lexists(out):
            os.rename(old, out)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot {step}: {_one_line(e)}") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def stream_rewrite(
    reader,
    writer: CheckpointWriter,
    edit: Callable[[str, torch.Tensor], torch.Tensor | None],
    extra=None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Copy every tensor of ``reader`` into ``writer``, passing each through ``edit``.

    ``edit(name, tensor)`` gets the stored tensor (its stored dtype) and returns
    ``None`` (unchanged: written byte-identical) or a tensor of the same shape,
    which is cast back to the stored dtype.  Tensors are loaded, edited and
    written one at a time, so memory stays flat in the model size.

    ``extra`` lists new tensors appended after the model's own:
    ``(name, tensor_fn)`` is evaluated once before streaming (its shape and dtype
    are needed for the plan) and written right away; ``(name, tensor_fn, dtype,
    shape)`` is evaluated lazily after the stream.  ``progress(done, total,
    name)`` is called after each tensor.  Returns the names ``edit`` changed.
    """
    names = list(reader.names)
    specs = [(n, reader.dtype(n), tuple(reader.shape(n))) for n in names]
    early: list[tuple[str, torch.Tensor]] = []
    late: list[tuple[str, Callable[[], torch.Tensor]]] = []
    taken = set(names)
    for item in extra or ():
        if len(item) == 2:
            name, fn = item
            t = fn()
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"extra tensor {name}: expected a torch.Tensor, got {type(t).__name__}")
            early.append((name, t))
            spec = (name, t.dtype, tuple(t.shape))
        elif len(item) == 4:
            name, fn, dtype, shape = item
            late.append((name, fn))
            spec = (name, dtype, tuple(shape))
        else:
            raise CheckpointError(f"extra entries must be (name, fn) or (name, fn, dtype, shape), got {item!r}")
        if name in taken:
            raise CheckpointError(f"extra tensor {name} already exists in the checkpoint")
        taken.add(name)
        specs.append(spec)
    writer.plan(specs)

    total = len(specs)
    done = 0
    for name, t in early:
        writer.write(name, t)
        done += 1
        if progress:
            progress(done, total, name)
    early.clear()

    edited: list[str] = []
    for name in names:
        tensor = reader.get(name)
        new = edit(name, tensor)
        if new is None:
            out = tensor
        else:
            if not isinstance(new, torch.Tensor):
                raise CheckpointError(f"edit of tensor {name} returned {type(new).__name__}, not a tensor")
            if tuple(new.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"edit changed the shape of tensor {name}: {tuple(tensor.shape)} -> {tuple(new.shape)}"
                )
            out = new.detach().to(device="cpu", dtype=tensor.dtype)
            edited.append(name)
        writer.write(name, out)
        del tensor, new, out
        done += 1
        if progress:
            progress(done, total, name)

    for name, fn in late:
        t = fn()
        writer.write(name, t)
        del t
        done += 1
        if progress:
            progress(done, total, name)
    return edited


__all__ = ["CheckpointWriter", "stream_rewrite", "move_into_place", "build_header", "shard_name",
           "DEFAULT_MAX_SHARD_BYTES"]
