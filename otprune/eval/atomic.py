"""Writing files without ever writing through a symbolic link: every file otprune writes goes through here.

`write_text` / `replacing`: the content goes to a temporary file with a random name in the target's
folder, is flushed to disk (fsync), given the mode the umask asks for (0666 & ~umask, as `open`
would) and renamed over the target with `os.replace`. A rename replaces the
directory entry itself: when the target is a symbolic link, the link is replaced by the new file
and whatever it pointed to is left untouched; readers never see a half-written file.

`open_append`: per-sample records are appended line by line; the file is opened with O_NOFOLLOW
(a link at the path is an error, never followed), and created with O_EXCL when the caller asks
for a file of its own (the writer then checks at each append that the path is still that file).

A folder that cannot be written (read-only, disk full, no permission) raises `WriteError`, whose
message is one line naming the folder.

`python -m otprune.eval.atomic FILE` writes its standard input to FILE this way.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


class WriteError(OSError):
    """A file could not be written; the message names the folder and the reason."""


def file_mode() -> int:
    """The mode a new file gets from the umask (0666 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def replacing(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target` (same suffix); on success it replaces `target` (never
    followed when it is a link), on error it is removed and `target` is left as it was. A caller that
    removes the temporary file leaves `target` alone."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    except OSError as err:
        raise _write_error(target, err) from None
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        if not temporary.exists():
            return
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, file_mode())
        os.replace(temporary, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(target, err) from None
        raise


def _write_error(target: Path, err: OSError) -> WriteError:
    reason = err.strerror or str(err)
    return WriteError(err.errno, f"cannot write {target.name} in {target.parent.resolve()}: {reason}")


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `target` atomically (temporary file + rename); returns `target` as a Path."""
    with replacing(target) as temporary:
        temporary.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `target` atomically (temporary file + rename); returns `target` as a Path."""
    return write_bytes(target, text.encode(encoding))


def open_append(path: str | os.PathLike, *, create: bool) -> tuple[int, os.stat_result]:
    """Open `path` for appending without following a link: (file descriptor, its stat).

    create=True: the file must not exist yet (O_EXCL: a file, or a link, already there is an error);
    create=False: it must exist and be a regular file (O_NOFOLLOW: a link there is an error).
    """
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    try:
        handle = os.open(path, flags, 0o644)
    except FileExistsError:
        raise FileExistsError(f"{path}: exists already; records go to a file of their own (a new name per process)") from None
    except OSError as err:
        if Path(path).is_symlink():
            raise OSError(f"{path}: is a symbolic link; records are never written through a link") from None
        raise OSError(f"{path}: cannot open for appending ({err.strerror})") from None
    info = os.fstat(handle)
    return handle, info


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m otprune.eval.atomic FILE  (writes standard input to FILE atomically)", file=sys.stderr)
        return 2
    write_bytes(args[0], sys.stdin.buffer.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
