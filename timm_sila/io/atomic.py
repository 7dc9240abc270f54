"""The one atomic writer of timm-sila's outputs: a folder of files (`strip`; the model card in such a folder) or a
single file (`export`, `EarlyExit.save`, `exit-curve --png`, the reports and logs of the benchmarks and examples).

Rules, the same for every writer (POSIX; an output on one local filesystem):

* Nothing is replaced that the caller did not name. An existing output is replaced only with `overwrite=True` (the
  CLI's `--force`), and never when it is one of the call's `sources` (its inputs, compared by real path), even with
  overwrite. The refusals come before anything is written; `check_output_dir` / `check_output_file` make them
  before slow work, and the writer makes them again at the end.
* The last step creates without replacing. Without overwrite each file is put in place by a hard link, which fails
  when the name exists (where the filesystem has no hard links: renameat2 RENAME_NOREPLACE, else a check and a
  rename): a file that appears at the output while the writer runs is kept and the write fails (OutputExistsError).
* In a folder, overwrite replaces only files timm-sila wrote. Each output folder holds a manifest,
  `.timm-sila-manifest.json` ({file name: sha256}), committed with its files. With overwrite, a folder holding any
  other file, or a listed file changed since, is refused (ForeignFilesError, naming them); a folder without a
  manifest holds no file timm-sila wrote. A whole-folder writer (`strip`) leaves exactly the files it wrote: one it
  wrote earlier and not now (the card, after `card=False`) is removed. Single files have no manifest: the caller
  named the file itself.
* Whole old set or whole new set, at every instant. Files are written into a temp folder beside the output and
  flushed. The commit moves the files it replaces into the temp folder's `previous/` (the commit marker,
  `config.json`, first), checks them against the manifest, links the new files in (the commit marker last), and
  only then discards `previous/`. Whether a commit finished is read from the filesystem (is the new commit marker
  in place?) and an unfinished one is undone from what `previous/` holds, so an exception at any step, a
  KeyboardInterrupt included, leaves the old set; SIGINT/SIGTERM/SIGHUP are held until the commit is settled. A
  temp folder whose `previous/` still holds old files is never deleted: it is left, marked, for the next writer.
* Kill-safe. Each temp folder holds a marker file `.timm-sila-writer` that its writer keeps locked (`flock`) while
  it lives, recording the commit in progress. The next writer of the folder (or of any file in it) settles the
  temp folders whose marker is no longer locked -- their writer is dead -- as above, removes them and logs a
  warning. A folder that merely shares the name prefix (no marker, or a marker still locked) is never touched.
* One folder writer at a time. `atomic_output_dir` holds an exclusive, non-blocking `flock` on the output folder;
  a second concurrent writer fails at once with OutputBusyError (no check-then-act race, no lock file left).

Exceptions (all `OSError`s; `OutputError` is the one to catch; the CLI maps them to exit status 2):
    OutputError(OSError)                              a write was refused or failed; the old state is unchanged
      OutputExistsError(OutputError, FileExistsError)   the output exists (or appeared) and overwrite was not given
      ForeignFilesError(OutputError, FileExistsError)   the folder holds files timm-sila did not write; `.files`
      OutputBusyError(OutputError, BlockingIOError)     another process is writing the same folder now
      SourceInOutputError(OutputError, ValueError)      the output is, contains or lies in an input of the call
      OutputWriteError(OutputError)                     the OS refused a write (`.errno`: ENOSPC, EACCES, EISDIR...)
      OutputPathError(OutputError)                      the output path cannot be used as given: its folder is
        missing (also a FileNotFoundError), it is a folder where a file is wanted (IsADirectoryError) or the reverse
        (NotADirectoryError), or timm-sila reserves its name
`e.message(overwrite='--force')` words a refusal for an interface with another name for overwrite (the CLI).
"""
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from timm_sila._checks import listing

__all__ = [
    'OutputError', 'OutputExistsError', 'ForeignFilesError', 'OutputBusyError', 'SourceInOutputError',
    'OutputWriteError', 'OutputPathError', 'output_path_error', 'check_output_dir', 'check_output_file', 'atomic_output_dir', 'atomic_write_file',
    'read_manifest', 'TMP_PREFIX', 'MARKER_NAME', 'MANIFEST_NAME',
]

TMP_PREFIX = '.timm-sila-tmp-'
MARKER_NAME = '.timm-sila-writer'  # inside each temp folder: JSON about the writer, flock'd while it lives
MANIFEST_NAME = '.timm-sila-manifest.json'  # inside each output folder: {file name: sha256} of what timm-sila wrote
_PREVIOUS = 'previous'  # inside a temp folder: the files being replaced, while the commit runs
_LINK_PROBE = '.link-probe'
_WRITER = 'timm-sila'
_SHOWN = 6  # file names one message lists before "(+N more)"
_MAX_JSON = 1 << 20  # a marker or manifest larger than this is not one timm-sila wrote
_SHA256 = re.compile(r'^[0-9a-f]{64}$')
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r'[a-z0-9_]{8}$')  # the names tempfile.mkdtemp gives
# link() errors that mean "this filesystem has no hard links" (FAT, some network and FUSE filesystems)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}
_HELD_SIGNALS = tuple(getattr(signal, name) for name in ('SIGINT', 'SIGTERM', 'SIGHUP') if hasattr(signal, name))
_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class OutputError(OSError):
    """A write that was refused or failed; the output's previous state is unchanged."""
    option = 'overwrite'

    def __init__(self, message: str, path: Optional[PathLike] = None, err: Optional[int] = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.errno = err

    def message(self, overwrite: str = 'overwrite=True', **other_names: str) -> str:
        """The message, naming the option that allows overwriting as `overwrite` (e.g. '--force' in a CLI); every
        library error that names an API argument takes the interface's names this way, ignoring the others."""
        return str(self)


class _Worded(OutputError):
    """A refusal whose message names the overwrite option: `str(e)` is `e.message()`, naming overwrite=True."""

    def __init__(self, path: PathLike, template: str, err: int = errno.EEXIST):
        self.template = template  # with an {option} field
        super().__init__(self.message(), path, err)

    def message(self, overwrite: str = 'overwrite=True', **other_names: str) -> str:
        return self.template.replace('{option}', overwrite)


class OutputExistsError(_Worded, FileExistsError):
    """The output exists (a folder: is not empty), or appeared while writing, and overwriting was not asked for.

    `.option` names the API argument that allows it ('overwrite'); `.message(overwrite=...)` words the same message
    for another interface, e.g. `e.message(overwrite='--force')` in a CLI.
    """


class ForeignFilesError(_Worded, FileExistsError):
    """The output folder holds files timm-sila did not write, or that changed since; overwrite does not replace
    them. `.files`: their names."""

    def __init__(self, path: PathLike, files: Sequence[str], template: str):
        self.files = list(files)
        super().__init__(path, template)


class OutputBusyError(OutputError, BlockingIOError):
    """Another process is writing the same output folder right now."""


class SourceInOutputError(OutputError, ValueError):
    """The output is, contains or lies in a file or folder the output is made from."""


class OutputWriteError(OutputError):
    """The operating system refused a write (`.errno` as the OS gave it: ENOSPC, EFBIG, EACCES, EISDIR, ...)."""


class OutputPathError(OutputError):
    """The output path cannot be used as given (a missing folder, a folder where a file is wanted or the reverse, a
    name timm-sila reserves); nothing was written. `output_path_error` makes the one that is also the matching
    builtin (FileNotFoundError, IsADirectoryError, NotADirectoryError)."""


_PATH_ERRORS = {errno.ENOENT: FileNotFoundError, errno.EISDIR: IsADirectoryError, errno.ENOTDIR: NotADirectoryError}
_PATH_ERROR_CLASSES: Dict[int, type] = {
    code: type(f'Output{builtin.__name__}', (OutputPathError, builtin), {'__module__': __name__})
    for code, builtin in _PATH_ERRORS.items()}


def output_path_error(message: str, path: PathLike, code: int) -> OutputPathError:
    """An OutputPathError that is also the builtin error of `code` (ENOENT, EISDIR, ENOTDIR; else only an
    OutputPathError), so both `except OutputError` and `except FileNotFoundError` catch it."""
    return _PATH_ERROR_CLASSES.get(code, OutputPathError)(message, path, code)


# --- file system helpers ----------------------------------------------------------------------------------------
def _flock(fd: int, blocking: bool = False) -> bool:
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


def _umask() -> int:
    """The process umask, read without changing it where the OS reports it (Linux: /proc/self/status), so no other
    thread creates a file under a wrong umask meanwhile; elsewhere set and restored at once."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """The mode open() gives a new file under the current umask (safetensors creates its files 0600)."""
    return 0o666 & ~_umask()


def _kept_mode(previous: Path, default: int) -> int:
    """The permission bits of the regular file a write replaces (so overwriting never widens or narrows who may
    read it), else `default`."""
    try:
        st = os.lstat(previous)
    except OSError:
        return default
    return st.st_mode & 0o777 if stat.S_ISREG(st.st_mode) else default  # permission bits only, never setuid


def _is_inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_output_name(name: object) -> bool:
    """A plain entry name of an output folder (what a marker or manifest may name; nothing outside the folder)."""
    return (isinstance(name, str) and name not in ('', '.', '..', MARKER_NAME) and os.sep not in name
            and '\0' not in name and not name.startswith(TMP_PREFIX) and (os.altsep is None or os.altsep not in name))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except FileNotFoundError:
        return False


def _read_small(path: Path) -> Optional[bytes]:
    """The bytes of a regular file of at most _MAX_JSON bytes (not followed if a link, never blocking on a FIFO)."""
    f = _open_regular(path)
    if f is None:
        return None
    with f:
        return None if os.fstat(f.fileno()).st_size > _MAX_JSON else f.read(_MAX_JSON + 1)


def _open_regular(path: Path):
    """`path` opened for reading if it is a regular file (not followed if a link, never blocking on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, 'rb')


def _sha256(path: Path) -> Optional[str]:
    """The sha256 of a regular file; None for anything else (a link, a folder, a FIFO, unreadable)."""
    f = _open_regular(path)
    if f is None:
        return None
    with f:
        digest = hashlib.sha256()
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def read_manifest(folder: PathLike) -> Dict[str, str]:
    """{file name: sha256} of the files timm-sila wrote in `folder`; {} when it holds no valid manifest."""
    raw = _read_small(Path(folder) / MANIFEST_NAME)
    try:
        data = json.loads(raw.decode('utf-8')) if raw is not None else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    files = data.get('files') if isinstance(data, dict) and data.get('writer') == _WRITER else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items()
            if _is_output_name(k) and k != MANIFEST_NAME and isinstance(v, str) and _SHA256.match(v)}


def _manifest_bytes(files: Dict[str, str]) -> bytes:
    return (json.dumps(dict(writer=_WRITER, files=dict(sorted(files.items()))), indent=1) + '\n').encode()


@functools.lru_cache(maxsize=None)
def _renameat2() -> Optional[Callable]:
    if not sys.platform.startswith('linux'):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _rename_no_replace(src: Path, dst: Path) -> None:
    """rename(src, dst) that fails with FileExistsError when dst exists (RENAME_NOREPLACE where the kernel and the
    filesystem have it; else a check, then the rename: only another process's write in between can be lost)."""
    fn = _renameat2()
    if fn is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise (FileExistsError if err == errno.EEXIST else OSError)(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _place(src: Path, dst: Path, link: bool) -> None:
    """Create dst as src without replacing anything (FileExistsError if dst exists): a hard link (src stays, so an
    undo can tell the new file by its inode), or a no-replace rename where there are no hard links."""
    if link:
        os.link(src, dst)
    else:
        _rename_no_replace(src, dst)


def _hard_links_work(tmp: Path) -> bool:
    probe = tmp / _LINK_PROBE
    try:
        os.link(tmp / MARKER_NAME, probe)
    except OSError as e:
        if e.errno in _NO_HARD_LINKS:
            return False
        raise
    os.unlink(probe)
    return True


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP that arrive inside are delivered on leaving (from the main thread; elsewhere Python
    runs no signal handler, so there is nothing to hold)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []
    saved = []
    for sig in _HELD_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:  # installed outside Python, or ignored: left alone
            continue
        try:
            signal.signal(sig, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError):
            continue
        saved.append((sig, handler))
    try:
        yield
    finally:
        _restore_handlers(saved)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


def _restore_handlers(saved: List[Tuple[int, object]]) -> None:
    """Each handler back, even when a signal delivered by an earlier one raises meanwhile."""
    if saved:
        try:
            signal.signal(*saved[0])
        finally:
            _restore_handlers(saved[1:])


# --- temp folders: the marker, the commit record, settling and recovery -----------------------------------------
def _read_marker(fd: int) -> Optional[dict]:
    try:
        info = json.loads(os.pread(fd, _MAX_JSON, 0).decode('utf-8'))
    except (ValueError, UnicodeDecodeError, OSError, RecursionError):
        return None
    return info if isinstance(info, dict) and info.get('writer') == _WRITER else None


def _write_marker(fd: int, info: dict) -> None:
    """Rewrite the marker in one write, padded with spaces over a longer old text (never truncated first: a kill
    in between would leave a marker that says nothing)."""
    data = json.dumps(info).encode()
    os.pwrite(fd, data.ljust(os.fstat(fd).st_size), 0)
    os.fsync(fd)


def _make_temp(parent: Path, commit_last: Optional[str]) -> Tuple[Path, int]:
    """A new temp folder in `parent` with its marker, locked; (folder, the marker's fd)."""
    for attempt in range(3):
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
        try:
            fd = os.open(tmp / MARKER_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            break
        except FileNotFoundError:  # another writer removed it as an empty leftover before the marker was in
            if attempt == 2:
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        _flock(fd, blocking=True)  # before the content: a marker with content and no lock means a dead writer
        _write_marker(fd, dict(writer=_WRITER, pid=os.getpid(), commit_last=commit_last))
    except BaseException:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, fd


def _committed(tmp: Path, parent: Path, last: str, link: bool) -> bool:
    """Whether the commit recorded in tmp finished: its commit marker left tmp (moved in; or linked in, then its
    name in tmp dropped), or is linked in and still shares its inode with tmp's."""
    if not os.path.lexists(tmp / last):
        return True
    return link and _same_file(tmp / last, parent / last)


def _settle(tmp: Path, parent: Path, info: dict) -> Tuple[bool, List[str]]:
    """Finish or undo the commit recorded in tmp's marker, reading the state from the filesystem only.

    Returns (done, restored): done when tmp holds nothing of the output's previous state any more (it may be
    removed); restored: the names put back from tmp/previous.
    """
    previous = tmp / _PREVIOUS
    placing, last = info.get('placing'), info.get('commit_last')
    if isinstance(placing, list) and all(map(_is_output_name, placing)) and _is_output_name(last):
        link = bool(info.get('link'))
        committed = _committed(tmp, parent, last, link)
    else:  # no commit recorded; an older writer's marker: unfinished while its commit marker is not in place
        placing, link = [], True
        committed = not _is_output_name(last) or os.path.lexists(parent / last)
    if committed:
        if previous.is_dir():
            shutil.rmtree(previous)
        return True, []
    for name in reversed(placing):  # take back the new files already in place
        new, dst = tmp / name, parent / name
        if link:
            if _same_file(new, dst):
                os.unlink(dst)
        elif not os.path.lexists(new) and os.path.lexists(dst):
            os.rename(dst, new)
    restored = []
    names = sorted(os.listdir(previous), key=lambda n: n == last) if previous.is_dir() else []
    for name in names:  # the old commit marker comes back last
        old, dst = previous / name, parent / name
        try:
            _put_back(old, dst, link)
        except FileExistsError:  # a file now stands at that name: both are kept
            continue
        restored.append(name)
    return not (previous.is_dir() and os.listdir(previous)), restored


def _put_back(old: Path, dst: Path, link: bool) -> None:
    """Move old to dst without replacing (FileExistsError); a link then an unlink, so that a put-back cut short
    is seen as done by the next one (both names, one inode)."""
    if link and not stat.S_ISDIR(os.lstat(old).st_mode):
        try:
            os.link(old, dst)
        except FileExistsError:
            if not _same_file(old, dst):
                raise
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            _rename_no_replace(old, dst)
            return
        os.unlink(old)
    else:
        _rename_no_replace(old, dst)


def _remove_tree(tmp: Path) -> None:
    """Remove a settled temp folder, its marker last (a removal cut short leaves a marked or an empty folder)."""
    with os.scandir(tmp) as entries:
        for entry in list(entries):
            if entry.name == MARKER_NAME:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
    if os.listdir(tmp) == [MARKER_NAME]:
        os.unlink(tmp / MARKER_NAME)
        os.rmdir(tmp)


def _release(tmp: Path, fd: int, parent: Path) -> None:
    """Settle this writer's commit, then remove its temp folder; or leave it, marked, for the next writer while it
    still holds previous files. Closes (unlocks) the marker."""
    done = False
    try:
        done = _settle(tmp, parent, _read_marker(fd) or {})[0]
        if done:
            _remove_tree(tmp)
    finally:
        os.close(fd)
        if not done:
            _logger.warning('Left %s: it holds the previous files of %s; the next timm-sila write there puts them '
                            'back.', tmp, parent)


def _remove_abandoned(folder: Path) -> None:
    """Settle and remove the temp folders in `folder` whose writer is provably dead (marker present, its lock
    free)."""
    removed, restored, kept = [], [], []
    with os.scandir(folder) as entries:
        candidates = [Path(e.path) for e in entries
                      if e.name.startswith(TMP_PREFIX) and e.is_dir(follow_symlinks=False)]
    for tmp in candidates:
        try:
            fd = os.open(tmp / MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            if _TMP_NAME.match(tmp.name):  # named as timm-sila names them: if empty, a removal cut short (or a
                try:                       # writer's before its marker is in: it makes another)
                    os.rmdir(tmp)
                except OSError:
                    pass
            continue  # no marker: not provably a timm-sila temp folder, left alone
        try:
            if not _flock(fd):
                continue  # its writer is alive
            info = _read_marker(fd)
            if info is None:
                continue  # not written by timm-sila, or its writer has not yet recorded itself
            with _signals_held():
                done, put_back = _settle(tmp, folder, info)
                restored += put_back
                if done:
                    _remove_tree(tmp)
            (removed if done else kept).append(tmp.name)
        finally:
            os.close(fd)
    if removed:
        _logger.warning('Removed %d temporary folder(s) in %s left by a timm-sila writer that was killed (%s)%s.',
                        len(removed), folder, ', '.join(removed),
                        f'; restored the previous {", ".join(restored)} it had moved aside' if restored else '')
    if kept:
        _logger.warning('Kept %s in %s: files now stand where the previous files it holds in previous/ belong; '
                        'compare them and move back the ones you want.', ', '.join(kept), folder)


def _written_files(tmp: Path) -> List[str]:
    names = []
    for entry in tmp.iterdir():
        if entry.name in (MARKER_NAME, _PREVIOUS):
            continue
        if not entry.is_file() or entry.is_symlink():
            raise OutputWriteError(f'The writer left {entry.name} in {tmp}, which is not a plain file.', entry)
        if not _is_output_name(entry.name) or entry.name == MANIFEST_NAME:
            raise OutputWriteError(f'The writer wrote {entry.name}, a name timm-sila reserves.', entry)
        names.append(entry.name)
    return names


def _finish(tmp: Path, target: Path) -> List[str]:
    """Flush what the writer put in `tmp` and give each file the mode of the file it replaces in `target`, or the
    default mode of a new file; returns the names."""
    names = _written_files(tmp)
    mode = _file_mode()
    for name in names:
        fd = os.open(tmp / name, os.O_RDONLY)  # opened before the mode changes: a kept mode may deny reading
        try:
            os.fchmod(fd, _kept_mode(target / name, mode))
            os.fsync(fd)
        finally:
            os.close(fd)
    return names


# --- the rules ----------------------------------------------------------------------------------------------------
def _is_internal(entry: os.DirEntry) -> bool:
    """The manifest, or a timm-sila temp folder (marked; or empty and named as timm-sila names them: a removal cut
    short): not the user's files."""
    if entry.name == MANIFEST_NAME:
        return entry.is_file(follow_symlinks=False)
    if entry.name.startswith(TMP_PREFIX) and entry.is_dir(follow_symlinks=False):
        folder = Path(entry.path)
        return (folder / MARKER_NAME).is_file() or (_TMP_NAME.match(entry.name) and not os.listdir(folder))
    return False


def _foreign(folder: Path, names: Sequence[str], manifest: Dict[str, str]) -> List[Tuple[str, str]]:
    """(name, what it is) of each of `names` in folder that timm-sila did not write, or that changed since."""
    found = []
    for name in names:
        path = folder / name
        if name == MANIFEST_NAME:
            if not os.path.isfile(path) or os.path.islink(path):
                found.append((name, 'not a plain file'))
        elif path.is_dir() and not path.is_symlink():
            found.append((name, 'a folder'))
        elif name not in manifest:
            found.append((name, ''))
        elif _sha256(path) != manifest[name]:
            found.append((name, 'changed since timm-sila wrote it'))
    return found


def _foreign_error(folder: Path, found: Sequence[Tuple[str, str]], has_manifest: bool) -> ForeignFilesError:
    names = listing([f'{name} ({note})' if note else name for name, note in found], _SHOWN)
    them = 'it' if len(found) == 1 else 'them'
    changed = any(note.startswith('changed') for _, note in found)
    where = (f'as listed in its {MANIFEST_NAME}' if has_manifest else
             f'as listed in the {MANIFEST_NAME} it writes beside them; this folder has no valid one')
    return ForeignFilesError(folder, [name for name, _ in found], (
        f'Output folder {folder} holds {"a file" if len(found) == 1 else "files"} timm-sila did not write'
        f'{" or that changed since" if changed else ""}: {names}. {{option}} replaces only files timm-sila wrote '
        f'({where}): move {them} elsewhere, or choose another output folder (nothing was changed).'))


def _appeared(path: Path, names: Sequence[str], overwrite: bool = False) -> OutputExistsError:
    shown = ', '.join(str(path / n) for n in names)
    then = 'Move it elsewhere and write again' if overwrite else 'Pass {option} to replace it'
    return OutputExistsError(path, f'{shown} appeared while timm-sila was writing and was kept; nothing was '
                                   f'replaced. {then}, or choose another output.')


def _check_target(out_dir: Path, sources: Sequence[PathLike], names: Optional[Sequence[str]] = None) -> None:
    """Refuse an output folder that is, contains or lies in an input (`names`: only these entries are written)."""
    real_out = os.path.realpath(out_dir)
    for source in sources:  # one that does not exist cannot be replaced: its reader reports it
        if not os.path.lexists(source):
            continue
        real = os.path.realpath(source)
        if names is not None:
            hit = next((n for n in [*names, MANIFEST_NAME]
                        if _is_inside(os.path.realpath(out_dir / n), real)), None)
            if hit is not None:
                raise SourceInOutputError(
                    f'Output {out_dir / hit} is or lies in the input {source}; writing it could replace the input. '
                    f'Choose another output (nothing was changed).', out_dir)
        elif _is_inside(real, real_out):
            raise SourceInOutputError(
                f'Output folder {out_dir} is or contains the input {source}; writing there could replace the '
                f'input. Choose another output folder (nothing was changed).', out_dir)
        elif os.path.isdir(source) and _is_inside(real_out, real):
            raise SourceInOutputError(
                f'Output folder {out_dir} lies in the input folder {source}; writing there could change the input. '
                f'Choose another output folder (nothing was changed).', out_dir)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise output_path_error(f'Output {out_dir} exists and is not a folder.', out_dir, errno.ENOTDIR)


def _lock(out_dir: Path) -> int:
    """An fd of out_dir holding its exclusive flock; OutputBusyError while another writer holds it."""
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    if not _flock(fd) or os.fstat(fd).st_ino != os.stat(out_dir).st_ino:
        os.close(fd)
        raise OutputBusyError(f'Output folder {out_dir} is being written by another process right now; wait for '
                              f'it to finish or choose another folder (nothing was changed).', out_dir, errno.EAGAIN)
    return fd


def _check_contents(out_dir: Path, overwrite: bool, what: str, names: Optional[Sequence[str]]) -> None:
    """With out_dir locked: settle after killed writers, then refuse what may not be replaced."""
    _remove_abandoned(out_dir)
    if names is None:
        with os.scandir(out_dir) as entries:
            present = sorted(e.name for e in entries if not _is_internal(e))
    else:
        present = [n for n in names if os.path.lexists(out_dir / n)]
    if not present:
        return
    if not overwrite:
        if names is not None:
            shown = ', '.join(str(out_dir / n) for n in present)
            raise OutputExistsError(out_dir, f'{shown} exists; pass {{option}} to replace it.')
        others = [n for n in present if n not in read_manifest(out_dir)]
        if others:  # overwrite would be refused too: say what is there
            raise OutputExistsError(out_dir, f'Output folder {out_dir} exists and is not empty: it holds '
                                             f'{listing(others, _SHOWN)}, not written by timm-sila. Choose another output '
                                             f'folder, or move {"it" if len(others) == 1 else "them"} elsewhere '
                                             f'({{option}} replaces only files timm-sila wrote).')
        raise OutputExistsError(out_dir, f'Output folder {out_dir} exists and is not empty; pass {{option}} to '
                                         f'replace the {what} timm-sila wrote there.')
    manifest = read_manifest(out_dir)
    found = _foreign(out_dir, present, manifest)
    if found:
        raise _foreign_error(out_dir, found, bool(manifest))


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


def _commit(tmp: Path, fd: int, out_dir: Path, written: Sequence[str], last: str, overwrite: bool,
            names: Optional[Sequence[str]]) -> None:
    """Put the files written in tmp into out_dir with a new manifest; any exception leaves a state `_settle` undoes.

    Order: record the commit in the marker; move the files replaced or removed into tmp/previous (`last` first) and
    check them against the old manifest; link the new files in without replacing (`last` last); drop tmp's name of
    `last`: from then on the commit is settled as finished.
    """
    if last not in written:
        raise OutputWriteError(f'The writer did not write {last}, the file a reader looks for; nothing was changed.',
                               out_dir)
    for name in written:
        dest = out_dir / name
        if dest.is_dir() and not dest.is_symlink():
            raise OutputWriteError(f'Cannot replace {dest}: it is a folder. Remove or rename it; nothing was changed.',
                                   dest, errno.EISDIR)
    old = read_manifest(out_dir)
    files = {} if names is None else {k: v for k, v in old.items() if k not in names}
    files.update({name: _sha256(tmp / name) for name in written})
    manifest = tmp / MANIFEST_NAME
    manifest.write_bytes(_manifest_bytes(files))
    _fsync(manifest)
    placing = [n for n in written if n != last] + [MANIFEST_NAME, last]
    removing = [n for n in (old if names is None else names) if n not in written] if overwrite else []
    aside = [n for n in dict.fromkeys([last, MANIFEST_NAME, *placing, *removing]) if os.path.lexists(out_dir / n)]
    if not overwrite and any(n != MANIFEST_NAME for n in aside):
        raise _appeared(out_dir, [n for n in aside if n != MANIFEST_NAME])
    link = _hard_links_work(tmp)
    _write_marker(fd, dict(_read_marker(fd) or {}, placing=placing, link=link, commit_last=last))
    previous = tmp / _PREVIOUS
    previous.mkdir()
    for name in aside:  # the commit marker leaves first
        os.replace(out_dir / name, previous / name)
    found = _foreign(previous, [n for n in aside if overwrite or n == MANIFEST_NAME], old)
    if found:  # a file was put there after the check, or changed since: it is put back
        raise _foreign_error(out_dir, found, bool(old))
    for name in placing:  # the commit marker comes in last
        try:
            _place(tmp / name, out_dir / name, link)
        except FileExistsError:
            raise _appeared(out_dir, [name], overwrite) from None
    if link:
        os.unlink(tmp / last)
    try:
        _fsync(out_dir, directory=True)
    except OSError as e:  # the new files are in place: reporting "previous files unchanged" would be false
        _logger.warning('%s: the new files are in place, but flushing the folder failed (%s).', out_dir, e)


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


def _check_file_target(path: Path, sources: Sequence[PathLike]) -> None:
    real = os.path.realpath(path)
    for source in sources:
        if os.path.lexists(source) and _is_inside(real, os.path.realpath(source)):
            what = 'the input' if real == os.path.realpath(source) else 'inside the input folder'
            raise SourceInOutputError(f'Output {path} is {what} {source}; writing it could replace the input. '
                                      f'Choose another path (nothing was changed).', path)


# --- public API ----------------------------------------------------------------------------------------------------
def check_output_dir(out_dir: PathLike, overwrite: bool = False, sources: Iterable[PathLike] = (),
                     what: str = 'files', names: Optional[Sequence[str]] = None) -> None:
    """The refusals of `atomic_output_dir`, writing nothing: call it before slow work so that a bad output fails
    first (atomic_output_dir checks again). Like a writer, it settles after a killed writer of `out_dir`."""
    out_dir = Path(out_dir)
    _check_target(out_dir, list(sources), names)
    if out_dir.is_dir():
        lock = _lock_or_refuse(out_dir)
        try:
            _check_contents(out_dir, overwrite, what, names)
        finally:
            os.close(lock)


def check_output_file(path: PathLike, overwrite: bool = False, sources: Iterable[PathLike] = ()) -> Path:
    """The refusals of `atomic_write_file`, writing nothing (call it before slow work); returns `path` as a Path.

    Refuses: `path` that is one of `sources` or lies in a source folder (SourceInOutputError, also with
    overwrite), whose folder does not exist (FileNotFoundError), that is a folder (IsADirectoryError), that
    exists without `overwrite` (OutputExistsError), or whose name timm-sila reserves (OutputPathError; the missing
    folder and the folder are OutputPathErrors too).
    """
    path = Path(path)
    if not _is_output_name(path.name) or path.name in (MANIFEST_NAME, _PREVIOUS, _LINK_PROBE):
        raise output_path_error(f'Cannot write {path}: timm-sila reserves the name {path.name!r}; choose another '
                                f'name.', path, errno.EINVAL)
    _check_file_target(path, list(sources))
    if not path.parent.is_dir():
        raise output_path_error(f'Cannot write {path}: folder {path.parent} does not exist; create it first.', path,
                                errno.ENOENT)
    if path.is_dir():
        raise output_path_error(f'Cannot write {path}: it is a folder; pass a file path.', path, errno.EISDIR)
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(path, f'{path} exists; pass {{option}} to replace it.')
    return path


@contextmanager
def atomic_output_dir(out_dir: PathLike, overwrite: bool = False, sources: Iterable[PathLike] = (),
                      what: str = 'files', commit_last: str = 'config.json',
                      names: Optional[Sequence[str]] = None) -> Iterator[Path]:
    """Write a set of files into `out_dir` atomically: yields an empty temp folder inside `out_dir`.

    When the body returns, the plain files it wrote into the yielded folder are committed to `out_dir` with its
    manifest (`commit_last`, which the body must write, goes in last). `names=None`: the writer owns the folder,
    which then holds exactly these files (files of an earlier write that are not written again are removed);
    `names=[...]`: only those entries are written, the others and their manifest entries are kept.
    If the body raises, nothing in `out_dir` changes (a folder this call created is removed) and an OSError is
    re-raised as OutputWriteError.
    Refuses, before touching anything: an `out_dir` that is, contains or lies in one of `sources` -- with `names`,
    an entry that is one (SourceInOutputError); that is a file (NotADirectoryError); without `overwrite`, one
    holding anything (`names`: one of them) (OutputExistsError, whose message names `what`); with `overwrite`,
    one holding such a file timm-sila did not write or that changed since (ForeignFilesError); and while another
    process writes `out_dir` (OutputBusyError). At the end, a file that appeared meanwhile is kept and the write
    fails (OutputExistsError; with overwrite, ForeignFilesError).
    """
    out_dir = Path(out_dir)
    sources = list(sources)
    names = None if names is None else list(names)
    _check_target(out_dir, sources, names)
    created = not os.path.lexists(out_dir)
    lock = _lock_or_refuse(out_dir, create=True)
    try:
        try:
            _check_contents(out_dir, overwrite, what, names)
            tmp, fd = _make_temp(out_dir, commit_last)
            written: Optional[List[str]] = None
            try:
                yield tmp
                files = _finish(tmp, out_dir)
                if names is not None and set(files) - set(names):
                    raise OutputWriteError(f'The writer wrote {sorted(set(files) - set(names))} into {out_dir}, '
                                           f'beyond the files it may write there ({names}).', out_dir)
                written = files
            finally:
                with _signals_held():
                    try:
                        if written is not None:
                            _check_target(out_dir, sources, names)
                            _commit(tmp, fd, out_dir, written, commit_last, overwrite, names)
                    finally:
                        _release(tmp, fd, out_dir)
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


def atomic_write_file(path: PathLike, write_fn: Callable[[Path], None], overwrite: bool = False,
                      sources: Iterable[PathLike] = ()) -> Path:
    """Write one file atomically: `write_fn(tmp_path)` writes it at a temp path beside `path` (same file name),
    which then becomes `path` in one step. Returns `path`.

    The refusals of `check_output_file` come first and again at the end; without `overwrite` the last step
    creates `path` without replacing, so a file that appeared there meanwhile is kept (OutputExistsError). If
    write_fn raises, `path` is unchanged and nothing is left behind (an OSError becomes OutputWriteError).
    Concurrent writers of the same path with overwrite each replace it whole (last wins).
    """
    path = Path(path)
    sources = list(sources)
    check_output_file(path, overwrite, sources)
    parent = path.parent
    try:
        _remove_abandoned(parent)
        tmp, fd = _make_temp(parent, None)
        done = False
        try:
            write_fn(tmp / path.name)
            if not (tmp / path.name).is_file():
                raise OutputWriteError(f'Cannot write {path}: the writer produced no file; nothing was changed.',
                                       path)
            _finish(tmp, parent)
            done = True
        finally:
            with _signals_held():
                try:
                    if done:
                        check_output_file(path, True, sources)
                        if overwrite:
                            os.replace(tmp / path.name, path)
                        else:
                            try:
                                _place(tmp / path.name, path, link=True)
                            except FileExistsError:
                                raise _appeared(path.parent, [path.name]) from None
                            except OSError as e:
                                if e.errno not in _NO_HARD_LINKS:
                                    raise
                                try:
                                    _place(tmp / path.name, path, link=False)
                                except FileExistsError:
                                    raise _appeared(path.parent, [path.name]) from None
                        _fsync(parent, directory=True)
                finally:
                    _release(tmp, fd, parent)
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
