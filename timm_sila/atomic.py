"""The one atomic writer of timm-sila's outputs: a folder of files (`strip`) or a single file (`EarlyExit.save`).

Guarantees (POSIX; the output on one local filesystem):

* Whole or nothing. Files are written into a temporary folder beside their destination, flushed to disk, then
  renamed into place; the commit marker (`config.json` for a folder) is moved aside first and renamed in last, so a
  reader never sees a `config.json` beside foreign or partial weights. A failure (disk full, a destination that is
  a folder, permission denied, ...) restores the previous files -- `config.json` included -- and removes the temp
  folder; a folder this call created is removed again.
* Kill-safe. Each temp folder holds a marker file `.timm-sila-writer` that its writer keeps locked (`flock`) while
  it lives and that records where the previous files were moved during the commit. The next writer (of the same
  folder, or of any file in that folder) removes temp folders whose marker is no longer locked -- their writer is
  dead -- after putting back the previous export if the kill came mid-commit, and logs a warning saying so. A folder
  that merely shares the name prefix (no marker, or a marker still locked) is never touched.
* One writer at a time. `atomic_output_dir` holds an exclusive, non-blocking `flock` on the output folder itself;
  a second concurrent writer fails at once with `OutputBusyError` (no check-then-act race, no lock file left).
* Never over its source. An output folder that is, or contains, one of the `sources` (compared by real path) is
  refused with `SourceInOutputError` before anything is touched.

Exceptions (all `OSError`s; `OutputError` is the one to catch; the CLI maps them to exit status 2):
    OutputError(OSError)                              a write was refused or failed; the old state is unchanged
      OutputExistsError(OutputError, FileExistsError)   non-empty output and no overwrite; `.option == 'overwrite'`
      OutputBusyError(OutputError, BlockingIOError)     another process is writing the same folder now
      SourceInOutputError(OutputError, ValueError)      the output folder is or contains an input file
      OutputWriteError(OutputError)                     the OS refused a write (`.errno`: ENOSPC, EACCES, EISDIR...)
"""
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

__all__ = [
    'OutputError', 'OutputExistsError', 'OutputBusyError', 'SourceInOutputError', 'OutputWriteError',
    'check_output_dir', 'atomic_output_dir', 'atomic_write_file', 'TMP_PREFIX', 'MARKER_NAME',
]

TMP_PREFIX = '.timm-sila-tmp-'
MARKER_NAME = '.timm-sila-writer'  # inside each temp folder: JSON about the writer, flock'd while it lives
_PREVIOUS = 'previous'  # inside a temp folder: the files being replaced, while the commit renames run
_WRITER = 'timm-sila'
_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class OutputError(OSError):
    """A write that was refused or failed; the output's previous state is unchanged."""

    def __init__(self, message: str, path: Optional[PathLike] = None, err: Optional[int] = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.errno = err


class OutputExistsError(OutputError, FileExistsError):
    """The output exists (a folder: is not empty) and overwriting was not asked for.

    `.option` names the API argument that allows it ('overwrite'); `.message(option)` words the same message for
    another interface, e.g. `e.message('--force')` in a CLI. `str(e)` is `e.message('overwrite=True')`.
    """
    option = 'overwrite'

    def __init__(self, path: PathLike, template: str):
        self.template = template  # with an {option} field
        super().__init__(self.message(), path, errno.EEXIST)

    def message(self, option: str = 'overwrite=True') -> str:
        return self.template.replace('{option}', option)


class OutputBusyError(OutputError, BlockingIOError):
    """Another process is writing the same output folder right now."""


class SourceInOutputError(OutputError, ValueError):
    """The output folder is, or contains, a file the output is made from."""


class OutputWriteError(OutputError):
    """The operating system refused a write (`.errno` as the OS gave it: ENOSPC, EFBIG, EACCES, EISDIR, ...)."""


# --- helpers -------------------------------------------------------------------------------------------------
def _flock(fd: int, blocking: bool = False) -> bool:
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a folder; the renames are still atomic
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _file_mode() -> int:
    """The mode open() gives a new file under the current umask (safetensors creates its files 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _is_inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _read_marker(fd: int) -> Optional[dict]:
    try:
        info = json.loads(os.read(fd, 65536).decode('utf-8'))
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    return info if isinstance(info, dict) and info.get('writer') == _WRITER else None


def _recover(tmp: Path, info: dict) -> List[str]:
    """Put back the files a killed commit had moved aside, unless the commit had finished (its last file is in)."""
    previous = tmp / _PREVIOUS
    last = info.get('commit_last')
    if not previous.is_dir() or not isinstance(last, str) or os.path.lexists(tmp.parent / last):
        return []
    restored = []
    for entry in sorted(previous.iterdir(), key=lambda p: p.name == last):
        os.replace(entry, tmp.parent / entry.name)
        restored.append(entry.name)
    return restored


def _remove_abandoned(folder: Path) -> None:
    """Remove the temp folders in `folder` whose writer is provably dead (marker present, its lock free)."""
    removed, restored = [], []
    with os.scandir(folder) as entries:
        candidates = [Path(e.path) for e in entries
                      if e.name.startswith(TMP_PREFIX) and e.is_dir(follow_symlinks=False)]
    for tmp in candidates:
        try:
            fd = os.open(tmp / MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # no marker: not provably a timm-sila temp folder, left alone
        try:
            if not _flock(fd):
                continue  # its writer is alive
            info = _read_marker(fd)
            if info is None:
                continue  # not written by timm-sila, or its writer has not yet recorded itself
            restored += _recover(tmp, info)
            shutil.rmtree(tmp)
            removed.append(tmp.name)
        finally:
            os.close(fd)
    if removed:
        _logger.warning('Removed %d temporary folder(s) in %s left by a timm-sila writer that was killed (%s)%s.',
                        len(removed), folder, ', '.join(removed),
                        f'; restored the previous {", ".join(restored)} it had moved aside' if restored else '')


@contextmanager
def _temp_folder(parent: Path, commit_last: Optional[str] = None) -> Iterator[Path]:
    """A new temp folder in `parent` with a locked marker; removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    fd = None
    try:
        fd = os.open(tmp / MARKER_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        _flock(fd, blocking=True)  # before the content: a marker with content and no lock means a dead writer
        os.write(fd, json.dumps(dict(writer=_WRITER, pid=os.getpid(), commit_last=commit_last)).encode())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _written_files(tmp: Path) -> List[str]:
    names = []
    for entry in tmp.iterdir():
        if entry.name in (MARKER_NAME, _PREVIOUS):
            continue
        if not entry.is_file() or entry.is_symlink():
            raise OutputWriteError(f'The writer left {entry.name} in {tmp}, which is not a plain file.', entry)
        names.append(entry.name)
    return names


def _commit(tmp: Path, out_dir: Path, names: Sequence[str], last: str) -> None:
    """Rename tmp/<names> over out_dir/<names>, `last` last; on failure put the previous files back."""
    order = sorted(names, key=lambda n: n == last)
    for name in order:
        dest = out_dir / name
        if dest.is_dir() and not dest.is_symlink():
            raise OutputWriteError(f'Cannot replace {dest}: it is a folder. Remove or rename it; nothing was changed.',
                                   dest, errno.EISDIR)
    previous = tmp / _PREVIOUS
    previous.mkdir()
    aside, placed = [], []
    try:
        for name in reversed(order):  # the commit marker leaves first and comes back last
            if os.path.lexists(out_dir / name):
                os.replace(out_dir / name, previous / name)
                aside.append(name)
        for name in order:
            os.replace(tmp / name, out_dir / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            if name not in aside:
                (out_dir / name).unlink(missing_ok=True)
        for name in sorted(aside, key=lambda n: n == last):
            os.replace(previous / name, out_dir / name)
        raise
    _fsync(out_dir, directory=True)


def _finish(tmp: Path) -> List[str]:
    """Flush what the writer put in `tmp` and give it the default file mode; returns the names."""
    names = _written_files(tmp)
    mode = _file_mode()
    for name in names:
        os.chmod(tmp / name, mode)
        _fsync(tmp / name)
    return names


def _embedded_os_error(e: BaseException) -> Optional[OSError]:
    """The OS error inside a library's own exception (safetensors raises SafetensorError '... (os error 28)')."""
    found = None if isinstance(e, OSError) else re.search(r'os error (\d+)\)', str(e))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _write_error(e: OSError, target: Path, previous: str) -> OutputWriteError:
    reason = e.strerror or str(e)
    where = f' ({e.filename})' if e.filename else ''
    return OutputWriteError(f'Cannot write {target}: {reason}{where}; {previous}.', target, e.errno)


def _is_empty(folder: Path) -> bool:
    """No entries besides timm-sila temp folders (a killed writer's leftovers are not the user's files)."""
    return all(p.name.startswith(TMP_PREFIX) and (p / MARKER_NAME).is_file() for p in folder.iterdir())


# --- public API ----------------------------------------------------------------------------------------------
def _check_target(out_dir: Path, sources: Sequence[PathLike]) -> None:
    real_out = os.path.realpath(out_dir)
    for source in sources:  # one that does not exist cannot be replaced: its reader reports it
        if os.path.lexists(source) and _is_inside(os.path.realpath(source), real_out):
            raise SourceInOutputError(
                f'Output folder {out_dir} is or contains the input {source}; writing there could replace the '
                f'input. Choose another output folder (nothing was changed).', out_dir)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise NotADirectoryError(f'Output {out_dir} exists and is not a folder.')


def _lock(out_dir: Path) -> int:
    """An fd of out_dir holding its exclusive flock; OutputBusyError while another writer holds it."""
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    if not _flock(fd) or os.fstat(fd).st_ino != os.stat(out_dir).st_ino:
        os.close(fd)
        raise OutputBusyError(f'Output folder {out_dir} is being written by another process right now; wait for '
                              f'it to finish or choose another folder (nothing was changed).', out_dir, errno.EAGAIN)
    return fd


def _check_contents(out_dir: Path, overwrite: bool, what: str) -> None:
    """With out_dir locked: clean up after killed writers, then refuse a non-empty folder unless overwrite."""
    _remove_abandoned(out_dir)
    if not overwrite and not _is_empty(out_dir):
        raise OutputExistsError(out_dir, f'Output folder {out_dir} exists and is not empty; pass {{option}} to '
                                         f'replace its {what}.')


def _lock_or_refuse(out_dir: Path, create: bool = False) -> int:
    """`_lock(out_dir)` (creating the folder first with `create`); an OS failure becomes one OutputWriteError."""
    try:
        if create:
            out_dir.mkdir(parents=True, exist_ok=True)
        return _lock(out_dir)
    except OutputError:
        raise
    except OSError as e:
        raise _write_error(e, out_dir, 'nothing was written') from e


# --- public API ----------------------------------------------------------------------------------------------
def check_output_dir(out_dir: PathLike, overwrite: bool = False, sources: Iterable[PathLike] = (),
                     what: str = 'files') -> None:
    """The refusals of `atomic_output_dir`, creating nothing: call it before slow work so that a bad output fails
    first (atomic_output_dir checks again). Like a writer, it cleans up after a killed writer of `out_dir`."""
    out_dir = Path(out_dir)
    _check_target(out_dir, list(sources))
    if out_dir.is_dir():
        lock = _lock_or_refuse(out_dir)
        try:
            _check_contents(out_dir, overwrite, what)
        finally:
            os.close(lock)


@contextmanager
def atomic_output_dir(out_dir: PathLike, overwrite: bool = False, sources: Iterable[PathLike] = (),
                      what: str = 'files', commit_last: str = 'config.json') -> Iterator[Path]:
    """Write a set of files into `out_dir` atomically: yields an empty temp folder inside `out_dir`.

    Every plain file the body writes into the yielded folder replaces the same-named file of `out_dir` when the
    body returns (`commit_last` renamed in last); other files of `out_dir` are kept. If the body raises, nothing
    in `out_dir` changes (a folder this call created is removed) and an OSError is re-raised as OutputWriteError.
    Refuses, before touching anything: an `out_dir` that is or contains one of `sources` (SourceInOutputError),
    that is a file (NotADirectoryError), or -- without `overwrite` -- that is not empty (OutputExistsError, whose
    message names `what`); and while another process writes `out_dir` (OutputBusyError).
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, list(sources))
    created = not os.path.lexists(out_dir)
    lock = _lock_or_refuse(out_dir, create=True)
    try:
        try:
            _check_contents(out_dir, overwrite or created, what)
            with _temp_folder(out_dir, commit_last) as tmp:
                yield tmp
                _commit(tmp, out_dir, _finish(tmp), commit_last)
        except OSError as e:
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()
            if isinstance(e, OutputError):
                raise
            raise _write_error(e, out_dir, 'the previous files are unchanged') from e
        except BaseException as e:
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()
            os_error = _embedded_os_error(e)
            if os_error is not None:
                raise _write_error(os_error, out_dir, 'the previous files are unchanged') from e
            raise
    finally:
        os.close(lock)


def atomic_write_file(path: PathLike, write_fn: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Write one file atomically: `write_fn(tmp_path)` writes it at a temp path beside `path`, which then
    replaces `path` by one rename. Returns `path`.

    If write_fn raises, `path` is unchanged and nothing is left behind (an OSError becomes OutputWriteError).
    The folder of `path` must exist; `path` may not be a folder (IsADirectoryError); `overwrite=False` refuses an
    existing `path` (OutputExistsError). Concurrent writers of the same path each replace it whole (last wins).
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f'Cannot write {path}: folder {parent} does not exist; create it first.')
    if path.is_dir():
        raise IsADirectoryError(f'Cannot write {path}: it is a folder; pass a file path.')
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(path, f'{path} exists; pass {{option}} to replace it.')
    try:
        _remove_abandoned(parent)
        with _temp_folder(parent) as tmp:
            write_fn(tmp / path.name)
            _finish(tmp)
            os.replace(tmp / path.name, path)
            _fsync(parent, directory=True)
    except OutputError:
        raise
    except OSError as e:
        raise _write_error(e, path, 'the previous file is unchanged') from e
    except Exception as e:
        os_error = _embedded_os_error(e)
        if os_error is None:
            raise
        raise _write_error(os_error, path, 'the previous file is unchanged') from e
    return path
