"""Atomic file output: write to a temp name in the target's folder, fsync, then rename.

* :func:`atomic_path` / :func:`atomic_write_bytes` / :func:`atomic_write_text`: one file. Readers
  never see a half-written file; on error the temp file is removed and the target is untouched.
* :class:`OutputDir`: a set of outputs written as one unit. Targets that already exist are
  refused (all listed in one :class:`OutputExistsError`) unless ``overwrite``; files are staged
  under temp names and only renamed into place by :meth:`OutputDir.commit`, so a failure part way
  leaves no partial outputs (and, with ``overwrite``, the previous files in place).

Temp names keep the target's name as a suffix (``.cmdeploy-tmp-<random>-labels.nii.gz``) so that
libraries choosing the format from the extension (nibabel's ``.gz``) still do the right thing; the
leading dot hides them from the DICOM folder reader.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from types import TracebackType

from cmdeploy.errors import InputError

TEMP_PREFIX = ".cmdeploy-tmp-"


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
            f"replace them or choose another output folder:\n{listing}"
        )


def temp_path_for(path: str | Path) -> Path:
    """A fresh temp name in ``path``'s folder that ends with ``path``'s full name."""
    p = Path(path)
    return p.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{p.name}")


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


def _existing(targets: Iterable[Path]) -> list[Path]:
    return [t for t in targets if t.exists() or t.is_symlink()]


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
    wrote nothing.
    """
    target = Path(path)
    tmp = temp_path_for(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written for '{target}' (no file at the temp path)")
        _fsync_file(tmp)
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
    empty.

    Attributes:
        root: the output folder.
        overwrite: replace existing targets instead of refusing them.
        written: targets renamed into place by :meth:`commit`.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.root = Path(path)
        self.overwrite = overwrite
        self.written: list[Path] = []
        self._staged: dict[Path, Path] = {}  # target -> temp
        self._created_dirs: list[Path] = []
        self._closed = False
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"output folder '{self.root}' exists and is not a folder")

    # -- naming and checks ------------------------------------------------------------------------

    def target(self, name: str | Path) -> Path:
        """The target path ``root / name`` of output ``name`` (a relative path without ``..``)."""
        rel = PurePath(name)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts:
            raise ValueError(f"output name must be a relative path inside the folder, got {str(name)!r}")
        return self.root / rel

    def existing(self, names: Iterable[str | Path]) -> list[Path]:
        """The targets among ``names`` that already exist."""
        return _existing(self.target(n) for n in names)

    def check(self, names: Iterable[str | Path]) -> None:
        """Raise :class:`OutputExistsError` listing every existing target (unless ``overwrite``)."""
        if self.overwrite:
            return
        found = self.existing(names)
        if found:
            raise OutputExistsError(found)

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

        Refuses an existing target (unless ``overwrite``) before anything is written, and a name
        staged twice. On an exception inside the block the temp file is removed.
        """
        if self._closed:
            raise RuntimeError("OutputDir is already committed or discarded")
        target = self.target(name)
        if target in self._staged:
            raise ValueError(f"output '{name}' is staged twice")
        self.check([name])
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
        """Rename every staged file into place; all or nothing.

        Re-checks the targets first (another process may have created one meanwhile). When a
        rename fails, the targets already renamed are removed (previous files restored when
        overwriting) and the remaining temp files deleted before the error propagates.
        """
        if self._closed:
            raise RuntimeError("OutputDir is already committed or discarded")
        found = [] if self.overwrite else _existing(self._staged)
        if found:
            self.discard()
            raise OutputExistsError(found)
        done: list[tuple[Path, Path | None]] = []  # (target, backup of the previous file)
        try:
            for target, tmp in self._staged.items():
                backup = None
                if target.exists():
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
        for folder in {t.parent for t, _ in done}:
            _fsync_dir(folder)
        self.written = [t for t, _ in done]
        self._staged.clear()
        self._closed = True
        return list(self.written)

    def discard(self) -> None:
        """Remove every staged temp file (and the folders created here, if left empty)."""
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
            self.commit()
        else:
            self.discard()
