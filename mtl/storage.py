"""Run storage through fsspec: a local folder or any URL (s3://, gs://, memory://, ...).

Writes are atomic for readers: a local file is written beside its target and renamed
over it; on other filesystems a whole object is written in one put, which object stores
publish atomically.  Larger structures (checkpoints) are published by writing a small
pointer file last (see mtl.checkpoint).
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mtl.errors import ConfigError, NotFound, StorageError


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


def basename(url: str) -> str:
    """The last part of a path or URL (a trial's name is its run folder's)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def filesystem(url: str):
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:
        raise StorageError(f"{url}: {exc}") from None
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def is_ephemeral(url: str) -> bool:
    """Storage that lives only in this process (fsspec's memory://)."""
    from fsspec.implementations.memory import MemoryFileSystem

    return isinstance(filesystem(url)[0], MemoryFileSystem)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    # Object-store filesystems cache listings per process; another process (a trial, a peer
    # rank, a second launch) may have written since: always ask the store itself.
    fs.invalidate_cache(path)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise NotFound(f"{url}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"{url}: a folder, not a file") from None
    except Exception as exc:   # noqa: BLE001 - a remote store's own errors (unreachable host, refused access)
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"{url}: cannot read ({reason})") from None


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_yaml(url: str, text: str | None = None):
    """A YAML file (or JSON, by its .json name) parsed; a syntax error is one ConfigError naming
    the file, line and column: ``grid.yaml:3:7: not valid YAML (found ...)``."""
    import json

    import yaml

    text = read_text(url) if text is None else text
    is_json = url.endswith(".json")
    try:
        return json.loads(text) if is_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = (f":{mark.line + 1}:{mark.column + 1}" if mark else
                 f":{exc.lineno}:{exc.colno}" if hasattr(exc, "lineno") else "")
        problem = getattr(exc, "problem", None) or getattr(exc, "msg", None) or exc
        raise ConfigError(f"{url}{where}: not valid {'JSON' if is_json else 'YAML'} ({problem})") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file so that no reader ever sees part of it."""
    fs, path = filesystem(url)
    try:
        fs.makedirs(fs._parent(path), exist_ok=True)
        if isinstance(fs, LocalFileSystem):
            tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fs.pipe_file(path, data)
    except OSError as exc:
        raise StorageError(f"cannot write {url}: {exc.strerror or exc}") from None


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_csv(url: str, rows: list[dict]) -> None:
    """Rows as a CSV file (one atomic write), the columns in their first appearance's order:
    a row may lack some (a task's metrics in another task's trial)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(url, buf.getvalue())


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


# write_bytes' temporary files: <name>.mtl-partial-<8 hex>, a mark no one else's file carries.
TMP_MARK = ".mtl-partial-"


def is_partial_write(name: str) -> bool:
    head, mark, tail = name.rpartition(TMP_MARK)
    return bool(mark and head and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail))


def remove_partial_writes(url: str, folders: list[str]) -> int:
    """Delete the temporary files a killed write_bytes left in the given ``folders`` of ``url``
    (only local filesystems have them: object stores put whole objects), and nothing else: not
    in other folders, not files of another name.  Returns how many."""
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(path):
        return 0
    removed = 0
    for folder in folders:
        where = os.path.join(path, folder)
        if not os.path.isdir(where):
            continue
        for name in os.listdir(where):
            if is_partial_write(name) and os.path.isfile(os.path.join(where, name)):
                os.unlink(os.path.join(where, name))
                removed += 1
    return removed


def listdir(url: str) -> list[str]:
    """Base names of the entries in a folder (empty if it does not exist)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def upload_files(local: str, url: str) -> None:
    """Copy the files of a local folder (not its subfolders) into the folder ``url``, each
    written whole (write_bytes).  For what libraries can only write to a local path."""
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as fh:
            write_bytes(join(url, name), fh.read())


def download_files(url: str, local: str) -> None:
    """Copy the files of the folder ``url`` into a local folder: for what libraries can only
    read from a local path."""
    os.makedirs(local, exist_ok=True)
    for name in listdir(url):
        with open(os.path.join(local, name), "wb") as fh:
            fh.write(read_bytes(join(url, name)))


def ensure_writable(url: str) -> None:
    """Fail early, with the URL named, if the run's storage cannot take files."""
    probe = join(url, f".write-probe-{uuid.uuid4().hex[:8]}")
    fs, path = filesystem(url)
    existed = _exists_quietly(fs, path)
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except (StorageError, OSError, PermissionError) as exc:
        if not existed:
            try:
                fs.rm(path, recursive=True)
            except Exception:
                pass
        reason = str(exc).split(": ", 1)[-1] if isinstance(exc, StorageError) else (exc.strerror or str(exc))
        raise StorageError(f"storage {url} is not writable: {reason}") from None


def _exists_quietly(fs, path) -> bool:
    try:
        return fs.exists(path)
    except Exception:
        return False


def save_torch(url: str, obj) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(url, buf.getvalue())


def load_torch(url: str):
    import torch

    return torch.load(io.BytesIO(read_bytes(url)), weights_only=True, map_location="cpu")
