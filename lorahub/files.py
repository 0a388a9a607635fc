"""Files: atomic writes (a crash or a bad input never leaves a half-written file or folder), one writer per
output (:func:`output_lock`), clean-up after a killed writer (:func:`sweep_stale`), sha256, hub snapshots."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .errors import LorahubBusyError, LorahubError, LorahubFileError, LorahubValueError

F = TypeVar("F", bound=Callable[..., Any])
# temp names are ``.NAME.tmp-PID-...`` / ``.NAME.old-PID``: the pid tells a dead writer's leftovers from a live one's
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:[-.].*)?$")
# what a file system says when it will not take a write: full, over quota, read-only, no permission, too big, I/O
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO})


def cache_dir() -> Path:
    """Where lorahub caches models and keeps its lock files: ``$LORAHUB_CACHE`` or ``$XDG_CACHE_HOME/lorahub``
    (~/.cache/lorahub)."""
    if os.environ.get("LORAHUB_CACHE"):
        return Path(os.environ["LORAHUB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorahub"


def is_write_error(e: BaseException) -> bool:
    """An OSError from the file system refusing a write (not one of lorahub's own errors)."""
    return isinstance(e, OSError) and not isinstance(e, LorahubError) and e.errno in WRITE_ERRNOS


def write_error(path: str | os.PathLike, e: OSError) -> LorahubFileError:
    """One line for a refused write, naming the output (not the temp file the error came from)."""
    code = errno.errorcode.get(e.errno or 0, "")
    return LorahubFileError(f"cannot write {path}: {e.strerror or e}{f' ({code})' if code else ''}; "
                            "nothing was left half-written there")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    A full or read-only file system raises a :class:`LorahubFileError` naming ``target``, the temp folder removed.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as e:
        if is_write_error(e):
            raise write_error(target, e) from None
        raise
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists; pass overwrite=True or choose another folder")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)  # a kill between these two renames: sweep_stale puts ``old`` back
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            raise write_error(target, e) from None  # type: ignore[arg-type]
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename; a full or read-only disk is one clear error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as e:
        if is_write_error(e):
            raise write_error(path, e) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_write_error(e):
            raise write_error(path, e) from None  # type: ignore[arg-type]
        raise


def append_line(path: str | os.PathLike, line: str, *, sync: bool = False) -> None:
    """Append ``line`` and a newline to ``path`` in one ``write`` (O_APPEND); ``sync``: fsync before returning.

    Why: a kill can then at worst leave a cut last line, and the next append (by the folder's one writer,
    :func:`output_lock`) first cuts that tail off, so no reader ever meets a broken line mid-file.
    """
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":  # the cut tail of a killed append: cut it off
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.ftruncate(fd, os.read(fd, size).rfind(b"\n") + 1)
            while data:
                data = data[os.write(fd, data):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if is_write_error(e):
            raise write_error(path, e) from None
        raise


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a syntax error says ``what`` it is, the file and the line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorahubValueError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hub_snapshot(repo_id: str, patterns: list[str], what: str) -> Path:
    """Local folder of a Hugging Face hub repo: the HF cache first, then one download attempt.

    Offline, this fails at once with a message naming ``what`` (no stack of retries).
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached: fall through to one online attempt
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LorahubFileError(
            f"{what}: hub repo {repo_id!r} is not in the local Hugging Face cache and could not be "
            f"downloaded ({first}). Connect to the hub once, or give a local folder."
        ) from None


# -- one writer per output, and what a killed writer leaves behind ---------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine); another user's process counts as alive."""
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would signal it; never sweep there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders that a killed lorahub process left in ``folder``; return them.

    Only names of the form ``.NAME.tmp-PID...`` / ``.NAME.old-PID`` whose process is gone are touched. An
    ``.NAME.old-PID`` whose ``NAME`` is missing (the kill fell between :func:`atomic_dir`'s two renames) is put
    back as ``NAME``: the folder is then as it was before that write began.
    """
    folder = Path(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    swept = []
    for entry in entries:
        m = TEMP_NAME.match(entry.name)
        if not m or pid_alive(int(m["pid"])):
            continue
        path, target = Path(entry.path), folder / m["name"]
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: leave it
            if m["kind"] == "old" and not target.exists():
                os.replace(path, target)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            swept.append(path)
    return swept


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of output ``path``: ``cache_dir()/locks/<sha256 of the resolved path>.lock``.

    Why there and not in or beside the output: a compose ``--out`` folder is replaced by a rename (a lock file
    inside would move away with the old folder, and the next writer would lock another file), and its parent
    may be any folder of the user's, where lorahub writes nothing of its own. Processes that share the
    cache dir (the same user and ``$LORAHUB_CACHE``) see each other's locks.
    """
    resolved = str(Path(path).expanduser().resolve())
    return cache_dir() / "locks" / f"{hashlib.sha256(resolved.encode()).hexdigest()[:32]}.lock"


_held = threading.local()  # lock file -> depth, of the locks this thread holds (a nested call is a no-op)


def holder_pid(lock: Path) -> str:
    """The pid written in a lock file by its holder ("unknown" if it has not written it yet)."""
    try:
        return lock.read_text(encoding="utf-8").split("\n", 1)[0].strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of output folder ``path`` while the block runs: one writer per output.

    A second process asking for it gets a :class:`LorahubBusyError` at once, naming the folder and the holder's
    pid, before it writes anything. The lock is an ``flock`` (the ``filelock`` package), which the kernel
    releases when its process ends, so a killed writer never blocks the next run. Nested calls in one thread
    (the CLI, then the library function it calls) share the one lock. On taking it, the leftovers of a killed
    writer beside and inside ``path`` are removed (:func:`sweep_stale`).
    """
    from filelock import FileLock, Timeout

    lock = lock_file(path)
    depth: dict[str, int] = _held.__dict__.setdefault("depth", {})
    if depth.get(str(lock)):
        depth[str(lock)] += 1
        try:
            yield lock
        finally:
            depth[str(lock)] -= 1
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LorahubFileError(f"cannot create the lock folder {lock.parent} ({e.strerror or e}); "
                               "set $LORAHUB_CACHE to a writable folder") from None
    before = holder_pid(lock)  # filelock < 4 truncates the file when it tries; read the holder's pid first
    flock = FileLock(str(lock), timeout=0)
    try:
        flock.acquire()
    except Timeout:
        pid = holder_pid(lock)
        raise LorahubBusyError(
            f"{path} is being written by another lorahub process (pid {before if pid == 'unknown' else pid}); "
            "one writer per output folder: wait for it to finish, or choose another folder"
        ) from None
    depth[str(lock)] = 1
    try:
        with open(lock, "w", encoding="utf-8") as f:  # for the refusal message of a second process
            f.write(f"{os.getpid()}\n{Path(path).expanduser().resolve()}\n")
        out = Path(path)
        sweep_stale(out.parent)
        if out.is_dir():
            for root, dirs, _ in os.walk(out):
                sweep_stale(root)
                dirs[:] = [d for d in dirs if not TEMP_NAME.match(d)]
        yield lock
    finally:
        depth.pop(str(lock), None)
        flock.release()


def locked_output(param: str) -> Callable[[F], F]:
    """Decorate a function whose argument ``param`` is an output folder: each call holds that folder's
    :func:`output_lock` (no lock when the argument is None), so the Python API is as safe as the CLI."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = signature.bind_partial(*args, **kwargs).arguments.get(param)
            if out is None:
                return fn(*args, **kwargs)
            with output_lock(out):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
