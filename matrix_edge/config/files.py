"""Why a file named in the configuration cannot be read, in words that
point at the fix: a missing file, or a directory on its way that this
user may not enter (certbot's ``live/`` and ``archive/`` are 0700)."""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path


def unreadable_reason(file_path: str) -> str | None:
    """None when ``file_path`` is a file this process can read; otherwise
    the reason, naming the directory that blocks it when that is the
    cause."""
    try:
        os.stat(file_path)
    except FileNotFoundError:
        blocked = _blocking_directory(file_path)
        if blocked is None:
            return f"file not found: {file_path}"
        return _denied(blocked, file_path)
    except PermissionError:
        blocked = _blocking_directory(file_path)
        if blocked is not None:
            return _denied(blocked, file_path)
        return f"permission denied: {file_path}"
    except OSError as e:
        return f"cannot read {file_path}: {e.strerror or e}"
    if os.path.isdir(file_path):
        return f"is a directory, not a file: {file_path}"
    if not os.access(file_path, os.R_OK):
        return f"file not readable by {_user()}: {file_path} (permission denied)"
    return None


def _blocking_directory(file_path: str) -> Path | None:
    """The first directory on the way to ``file_path`` that exists but
    cannot be searched, if any."""
    path = Path(os.path.abspath(file_path))
    for parent in reversed(path.parents):
        try:
            os.stat(parent)
        except OSError as e:
            if e.errno == errno.EACCES:
                return parent.parent
            return None
        if not os.access(parent, os.X_OK):
            return parent
    return None


def _denied(directory: Path, file_path: str) -> str:
    return (
        f"permission denied on directory {directory} (it must be searchable by "
        f"{_user()} to reach {file_path})"
    )


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"
