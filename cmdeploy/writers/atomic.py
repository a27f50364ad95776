"""Atomic file output: write to a temp name in the target's folder, fsync, then rename.

* :func:`atomic_path` / :func:`atomic_write_bytes` / :func:`atomic_write_text`: one file. Readers
  never see a half-written file; on error the temp file is removed and the target is untouched.
* :class:`OutputDir`: a set of outputs written as one unit. Targets that already exist are
  refused (all listed in one :class:`OutputExistsError`) unless ``overwrite``; files are staged
  under temp names and only renamed into place by :meth:`OutputDir.commit`, so a failure part way
  leaves no partial outputs (and, with ``overwrite``, the previous files in place).
* :func:`check_output_file`: the checks a single-file output gets before the work starts.

Safety rules shared by every writer:

* Only regular files are ever replaced. A target that is a folder, a symbolic link or any other
  non-regular file is an :class:`~cmdeploy.errors.InputError`, found by the checks before the work
  and again at commit, even with ``overwrite``: cmdeploy never moves or deletes what it did not
  write.
* Output folders are probed for writability (a temp file is created and removed) before the work.
* SIGINT and SIGTERM are deferred while staged files are renamed into place (and while they are
  discarded), so an interrupted run leaves either the complete previous state or the complete new
  outputs.
* Temp names are ``.cmdeploy-tmp-<pid>-<12 hex>-<target name>``: the target's name stays a suffix
  (nibabel picks the format from ``.gz``), the leading dot hides them from the DICOM folder reader,
  and the pid lets a later run remove the temp files of runs that died (:func:`remove_stale_temps`);
  nothing else is ever removed.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from types import TracebackType

from cmdeploy.errors import InputError

TEMP_PREFIX = ".cmdeploy-tmp-"
_TEMP_NAME = re.compile(r"^\.cmdeploy-tmp-(?:(?P<pid>[0-9]{1,10})-)?[0-9a-f]{12}-.+$", re.DOTALL)
_MAX_SUFFIX = 120  # characters of the target name kept in a temp name (file names max out at 255)
DEFERRED_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s)


class OutputExistsError(InputError):
    """Output targets already exist and overwriting was not asked for.

    Attributes:
        paths: the existing targets.
    """

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = sorted(Path(p) for p in paths)
        listing = "\n".join(f"  {p}" for p in self.paths)
        super().__init__(
            f"{len(self.paths)} output file(s) already exist; pass --overwrite (overwrite=True) to "
            f"replace them or choose another output:\n{listing}"
        )


def temp_path_for(path: str | Path) -> Path:
    """A fresh temp name in ``path``'s folder: ``.cmdeploy-tmp-<pid>-<random>-<name>``."""
    p = Path(path)
    return p.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{p.name[-_MAX_SUFFIX:]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its files
    return True


def is_stale_temp(path: str | Path) -> bool:
    """True for a file named like cmdeploy's temp files whose writing process no longer runs.

    Names without a pid (written by cmdeploy before pids were added) count as stale.
    """
    m = _TEMP_NAME.match(Path(path).name)
    if m is None:
        return False
    if m["pid"] is None:
        return True
    pid = int(m["pid"])
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the stale temp files (:func:`is_stale_temp`, regular files only) directly in ``folder``.

    Returns what was removed. Nothing that does not match cmdeploy's temp-name pattern is touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and is_stale_temp(entry.name):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver the first one to the usual handler.

    Only the main thread can install handlers; elsewhere the block runs unprotected (Python runs
    signal handlers in the main thread only, so a worker thread is not interrupted anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, object] = {}

    def hold(signum: int, _frame: object) -> None:
        received.append(signum)

    for s in DEFERRED_SIGNALS:
        try:
            previous[s] = signal.signal(s, hold)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        if received:
            signum = received[0]
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def existing_regular_file(path: str | Path, what: str = "output") -> bool:
    """True when ``path`` is an existing regular file, False when nothing is there.

    Raises :class:`InputError` when something else is there (a folder, a symbolic link, a device,
    a socket, ...): cmdeploy replaces only regular files.
    """
    p = Path(path)
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise InputError(f"{what} '{p}': a parent of this path is a file, not a folder") from None
    except OSError as exc:
        raise InputError(f"{what} '{p}': cannot inspect it ({exc.strerror or exc})") from None
    if stat.S_ISREG(mode):
        return True
    raise InputError(
        f"{what} '{p}' exists and is {_kind(mode)}; cmdeploy only replaces regular files (even with "
        "--overwrite): move it away or choose another output"
    )


def _nearest_existing(folder: Path) -> Path:
    f = folder
    while not (f.exists() or f.is_symlink()) and f.parent != f:
        f = f.parent
    return f


def check_writable_folder(folder: str | Path, what: str = "output folder") -> None:
    """Raise :class:`InputError` unless files can be created in ``folder`` (or, when it does not
    exist yet, in the nearest existing folder above it, where it will be created).

    Probes by creating and removing a temp file, so read-only mounts and missing permissions are
    found before the work (``os.access`` is not trusted: it ignores read-only file systems' ACLs).
    """
    f = Path(folder)
    base = _nearest_existing(f)
    if not base.is_dir():
        raise InputError(f"{what} '{f}': '{base}' is a file, not a folder")
    probe = temp_path_for(base / "write-probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise InputError(
            f"{what} '{f}' is not writable ({exc.strerror or exc}); choose another output or fix "
            "its permissions"
        ) from None
    os.close(fd)
    _remove(probe)


def check_output_file(
    path: str | Path, *, overwrite: bool, what: str = "output", folder_may_be_missing: bool = False
) -> Path:
    """The checks a single output file gets before any work: no folder or other non-regular file
    at ``path`` (even with ``overwrite``), no existing file unless ``overwrite``
    (:class:`OutputExistsError`), an existing (or, with ``folder_may_be_missing``, creatable),
    writable parent folder. Stale temp files of earlier runs in that folder are removed.
    Returns ``path``.
    """
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise InputError(f"{what} '{p}' is not a file name")
    if existing_regular_file(p, what) and not overwrite:
        raise OutputExistsError([p])
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir() and not folder_may_be_missing:
        raise InputError(f"{what} '{p}': folder '{parent}' does not exist")
    check_writable_folder(parent, what=f"{what} folder")
    remove_stale_temps(parent)
    return p


def check_output_files(
    paths: Iterable[str | Path], *, overwrite: bool, what: str = "output",
    folder_may_be_missing: bool = False,
) -> None:
    """:func:`check_output_file` for several targets, naming every existing one at once in the
    :class:`OutputExistsError` (unless ``overwrite``)."""
    paths = [Path(p) for p in paths]
    found = [p for p in paths if existing_regular_file(p, what)]
    if found and not overwrite:
        raise OutputExistsError(found)
    for p in paths:
        check_output_file(p, overwrite=True, what=what, folder_may_be_missing=folder_may_be_missing)


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # read-only file or platform without O_RDWR fsync: best effort
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Persist a rename (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _existing(targets: Iterable[Path], what: str = "output") -> list[Path]:
    return [t for t in targets if existing_regular_file(t, what)]


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s content to; on success fsync it and rename it to ``path``.

    The folder must exist. On any exception inside the block the temp file is removed and the
    exception propagates; ``path`` is not touched. Raises ``FileNotFoundError`` when the block
    wrote nothing and :class:`InputError` (before the block runs) when ``path`` is a folder, a
    symbolic link or another non-regular file.
    """
    target = Path(path)
    existing_regular_file(target)
    tmp = temp_path_for(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written for '{target}' (no file at the temp path)")
        _fsync_file(tmp)
        with deferred_signals():
            existing_regular_file(target)
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return target


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


class OutputDir:
    """A folder of outputs written all-or-nothing.

    Usage::

        with OutputDir("out", overwrite=False) as out:
            out.check(["labels.nii.gz", "report.json"])   # fail before doing any work
            with out.stage("labels.nii.gz") as tmp:       # a writer writes to tmp
                write_nifti_labels(tmp, series, objects)
            out.write_bytes("report.json", data)
        # leaving the block without error renames every staged file into place (commit);
        # an exception removes every staged temp file instead (discard)

    Names are relative paths inside the folder (sub-folders are created). The folder itself is
    created on the first write and removed again on discard when it was created here and is left
    empty. :meth:`check` also probes that the folders can be written and removes stale temp files
    of earlier, interrupted runs; :meth:`remove_on_commit` names outputs of an earlier run (as
    recorded in its report) that the commit removes unless this run writes them again.

    Attributes:
        root: the output folder.
        overwrite: replace existing targets (regular files only) instead of refusing them.
        written: targets renamed into place by :meth:`commit`.
        removed: outputs of an earlier run removed by :meth:`commit`.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.root = Path(path)
        self.overwrite = overwrite
        self.written: list[Path] = []
        self.removed: list[Path] = []
        self._staged: dict[Path, Path] = {}  # target -> temp
        self._stale: list[Path] = []
        self._created_dirs: list[Path] = []
        self._closed = False
        if (self.root.exists() or self.root.is_symlink()) and not self.root.is_dir():
            raise InputError(f"output folder '{self.root}' exists and is not a folder")

    # -- naming and checks ------------------------------------------------------------------------

    def target(self, name: str | Path) -> Path:
        """The target path ``root / name`` of output ``name`` (a relative path without ``..``)."""
        rel = PurePath(name)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts:
            raise ValueError(f"output name must be a relative path inside the folder, got {str(name)!r}")
        return self.root / rel

    def _check_parents(self, target: Path) -> None:
        for folder in reversed(target.parents):
            if folder == self.root or self.root in folder.parents:
                if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
                    raise InputError(f"output folder '{folder}' exists and is not a folder")

    def existing(self, names: Iterable[str | Path]) -> list[Path]:
        """The targets among ``names`` that already exist (:class:`InputError` for non-regular ones)."""
        return _existing(self.target(n) for n in names)

    def check(self, names: Iterable[str | Path]) -> None:
        """Check every target before the work starts.

        Raises :class:`InputError` when a target or a folder on its way is something other than a
        regular file or folder (even with ``overwrite``), :class:`OutputExistsError` listing every
        existing target (unless ``overwrite``), and :class:`InputError` when a folder cannot be
        written. Removes stale temp files of earlier runs from the folders.
        """
        targets = [self.target(n) for n in names]
        for t in targets:
            self._check_parents(t)
        found = _existing(targets)
        if found and not self.overwrite:
            raise OutputExistsError(found)
        folders = sorted({self.root, *(t.parent for t in targets)})
        probed: set[Path] = set()
        for f in folders:
            base = _nearest_existing(f)
            if base not in probed:
                probed.add(base)
                check_writable_folder(f)
        for f in folders:
            if f.is_dir():
                remove_stale_temps(f)

    def remove_on_commit(self, names: Iterable[str]) -> None:
        """Outputs of an earlier run (names relative to the folder, as recorded in its report) to
        remove when this run commits, unless it writes them again. Only regular files are removed,
        never through a symbolic link; names that leave the folder are ignored."""
        for n in names:
            try:
                self._stale.append(self.target(str(n)))
            except (ValueError, TypeError):
                continue

    @property
    def pending(self) -> list[Path]:
        """Targets staged but not committed yet."""
        return list(self._staged)

    # -- staging ----------------------------------------------------------------------------------

    def _ensure_dir(self, folder: Path) -> None:
        missing = []
        f = folder
        while not f.exists():
            missing.append(f)
            if f.parent == f:
                break
            f = f.parent
        folder.mkdir(parents=True, exist_ok=True)
        self._created_dirs.extend(reversed(missing))  # outermost first

    @contextmanager
    def stage(self, name: str | Path) -> Iterator[Path]:
        """Yield a temp path for output ``name``; it is renamed into place on :meth:`commit`.

        Refuses an existing target (unless ``overwrite``) or a non-regular one before anything is
        written, and a name staged twice. On an exception inside the block the temp file is removed.
        """
        if self._closed:
            raise RuntimeError("OutputDir is already committed or discarded")
        target = self.target(name)
        if target in self._staged:
            raise ValueError(f"output '{name}' is staged twice")
        self._check_parents(target)
        if existing_regular_file(target) and not self.overwrite:
            raise OutputExistsError([target])
        self._ensure_dir(target.parent)
        tmp = temp_path_for(target)
        try:
            yield tmp
            if not tmp.is_file():
                raise FileNotFoundError(f"nothing was written for output '{target}'")
            _fsync_file(tmp)
        except BaseException:
            _remove(tmp)
            raise
        self._staged[target] = tmp

    def write_bytes(self, name: str | Path, data: bytes) -> Path:
        """Stage ``data`` as output ``name``; returns the final target path."""
        with self.stage(name) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
        return self.target(name)

    def write_text(self, name: str | Path, text: str, encoding: str = "utf-8") -> Path:
        """Stage ``text`` as output ``name``; returns the final target path."""
        return self.write_bytes(name, text.encode(encoding))

    # -- commit / discard -------------------------------------------------------------------------

    def commit(self) -> list[Path]:
        """Rename every staged file into place; all or nothing (SIGINT/SIGTERM wait until it ends).

        Re-checks the targets first (another process may have created one meanwhile, or put a
        folder there). When a rename fails, the targets already renamed are removed (previous files
        restored when overwriting) and the remaining temp files deleted before the error propagates.
        Then removes the earlier run's outputs named by :meth:`remove_on_commit` that this run did
        not write again.
        """
        if self._closed:
            raise RuntimeError("OutputDir is already committed or discarded")
        with deferred_signals():
            try:
                found = _existing(self._staged)
            except InputError:
                self.discard()
                raise
            if found and not self.overwrite:
                self.discard()
                raise OutputExistsError(found)
            done: list[tuple[Path, Path | None]] = []  # (target, backup of the previous file)
            try:
                for target, tmp in self._staged.items():
                    backup = None
                    if existing_regular_file(target):
                        backup = temp_path_for(target)
                        os.replace(target, backup)
                    done.append((target, backup))
                    os.replace(tmp, target)
            except BaseException:
                for target, backup in reversed(done):
                    _remove(target)
                    if backup is not None:
                        os.replace(backup, target)
                self.discard()
                raise
            for _target, backup in done:
                if backup is not None:
                    _remove(backup)
            self.written = [t for t, _ in done]
            self._remove_stale(set(self.written))
            for folder in {t.parent for t, _ in done}:
                _fsync_dir(folder)
            self._staged.clear()
            self._closed = True
        return list(self.written)

    def _remove_stale(self, keep: set[Path]) -> None:
        for t in self._stale:
            if t in keep or any(p.is_symlink() for p in t.parents if self.root in p.parents):
                continue
            try:
                if not stat.S_ISREG(os.lstat(t).st_mode):
                    continue
                t.unlink()
            except OSError:
                continue
            self.removed.append(t)
            for folder in t.parents:  # folders emptied by the removal, up to the root
                if folder == self.root or self.root not in folder.parents:
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break

    def discard(self) -> None:
        """Remove every staged temp file (and the folders created here, if left empty)."""
        with deferred_signals():
            for tmp in self._staged.values():
                _remove(tmp)
            self._staged.clear()
            for folder in reversed(self._created_dirs):  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    pass
            self._created_dirs.clear()
            self._closed = True

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed:
            return
        if exc_type is None:
            try:
                self.commit()
            except BaseException:  # e.g. a signal just before the commit deferred it
                if not self._closed:
                    self.discard()
                raise
        else:
            self.discard()
