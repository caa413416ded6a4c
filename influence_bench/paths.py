"""Where things live on disk, the one way this project writes a file (atomically: temp file in the
same folder, fsync, ``os.replace``) and reads one back (``UnreadableFile`` naming the path), and how
a damaged file is set aside (``set_aside``) and reported (``report``: one line on stderr)."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def cache_dir() -> Path:
    """Trained models and ground truth: ``$INFLUENCE_BENCH_CACHE`` or the user cache dir."""
    env = os.environ.get("INFLUENCE_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "influence-bench"


def data_dir() -> Path:
    """Dataset root: ``$INFLUENCE_BENCH_DATA`` or ``<cache>/data``."""
    env = os.environ.get("INFLUENCE_BENCH_DATA")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "data"


def portable(source: str) -> str:
    """``source`` with this machine's data root written as ``$INFLUENCE_BENCH_DATA``: what goes
    into records that are committed or compared across machines (run files, the baseline, shipped
    models) names the file, not where one machine keeps it."""
    root = str(data_dir())
    return source.replace(root.rstrip("/") + "/", "$INFLUENCE_BENCH_DATA/").replace(root, "$INFLUENCE_BENCH_DATA")


class UnreadableFile(ValueError):
    """A stored file (model cache, sidecar, curvature record, ground-truth shard, shipped model) that
    cannot be read as what it claims to be: truncated, empty, not an ``.npz`` / not JSON, holding a
    pickled object array, or holding JSON's ``NaN``. ``path`` names it, ``why`` says what failed.
    (A missing file is ``FileNotFoundError``, not this.)"""

    def __init__(self, path: Path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{path} is unreadable ({why})")


class WriteFailed(OSError):
    """Writing ``path`` failed (folder not writable, disk full, ...). ``errno`` and ``strerror`` are
    the cause's; nothing half-written is left at ``path`` (``atomic_path``)."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or f"{type(cause).__name__}: {cause}")
        self.path, self.cause = Path(path), cause
        self.filename = str(path)

    @property
    def reason(self) -> str:
        return self.strerror

    def __str__(self) -> str:
        return f"cannot write {self.path} ({self.reason})"


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def report(message: str) -> None:
    """One line on stderr, ``influence-bench: MESSAGE``: what the storage layer did about a damaged
    or unwritable file (set it aside, recomputed, went on without caching)."""
    print(f"influence-bench: {' '.join(message.split())}", file=sys.stderr, flush=True)


_REPORTED: set = set()


def report_write_failure(folder: Path, exc: OSError, message: str) -> None:
    """``report`` a failed write, once per folder and cause (errno) in this process: a cache folder
    that is not writable, or a full disk, is said once, not once per file that cannot be kept."""
    key = (str(Path(folder).resolve()), exc.errno)
    if key not in _REPORTED:
        _REPORTED.add(key)
        report(message)


def set_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<path>.bad-<n>`` (n = 1, 2, ...) and return that name: a
    damaged file is kept for inspection, never deleted. Raises ``OSError`` when it cannot be moved."""
    path = Path(path)
    for n in range(1, 10_000):
        target = path.with_name(f"{path.name}.bad-{n}")
        if target.exists() or target.is_symlink():
            continue
        try:
            os.link(path, target)  # fails if another process took this name meanwhile
        except FileExistsError:
            continue
        except OSError:  # no hard links here (some file systems) or a folder: plain rename
            if target.exists():
                continue
            os.replace(path, target)
            return target
        os.unlink(path)
        return target
    raise OSError(errno.EEXIST, f"no free name {path.name}.bad-<n>")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    A crash (or an exception in the body) never leaves a half-written ``path``: the temporary file
    is removed and ``path`` keeps what it held. An ``OSError`` (folder not writable, disk full) is
    raised as ``WriteFailed`` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise WriteFailed(path, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _final_mode(path))  # mkstemp's 0600 would make every run file private
        os.replace(tmp_path, path)
    except WriteFailed:
        raise
    except OSError as exc:
        raise WriteFailed(path, exc) from exc
    finally:
        try:
            tmp_path.unlink(missing_ok=True)
        except OSError:
            pass


def _final_mode(path: Path) -> int:
    """The mode ``path`` keeps (an existing file's), or a new file's: 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _write_bytes_synced(fh, data: bytes | None = None) -> None:
    if data is not None:
        fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())  # on disk before the rename makes it the file


def write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            _write_bytes_synced(fh, data)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            _write_bytes_synced(fh)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``. Raises ``UnreadableFile`` (naming ``path``) for a
    file that is not an intact ``.npz`` of plain arrays: truncated, empty, flipped bits (the zip's
    CRC), a ``.npy`` or pickle, or a pickled object array (``allow_pickle=False``)."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # whatever numpy and zipfile raise for a damaged file
        raise UnreadableFile(path, _why(exc)) from exc
    if not hasattr(z, "files"):  # a bare .npy array
        raise UnreadableFile(path, "a .npy array, not an .npz archive")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise UnreadableFile(path, _why(exc)) from exc


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_json(path: Path) -> Any:
    """The JSON document at ``path``. Raises ``UnreadableFile`` (naming ``path``) for a file that is
    empty, truncated, not UTF-8 or not JSON (``NaN`` and ``Infinity`` included: writers refuse them)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableFile(path, _why(exc)) from exc
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise UnreadableFile(path, _why(exc) if text.strip() else "empty file") from exc


def repo_root() -> Path | None:
    """The checkout this package runs from (``pyproject.toml`` beside the package), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def shipped_gt_dir() -> Path | None:
    """Read-only ground truth shipped with the checkout (``results/ground-truth``), or
    ``$INFLUENCE_BENCH_SHIPPED_GT``; None when that variable is set empty (disabled) or no checkout."""
    env = os.environ.get("INFLUENCE_BENCH_SHIPPED_GT")
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    root = repo_root()
    return root / "results" / "ground-truth" if root is not None else None
