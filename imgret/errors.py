"""Errors that a user can act on: each message names the bad value and what to do instead; the one check of a
whole number; and how an entry point turns an error into its one line and exit code."""
import sys
from typing import NoReturn


class ImgretError(Exception):
    """Base class: an error imgret explains, as opposed to a bug."""


class ConfigError(ImgretError, ValueError):
    """A configuration value is out of range or names something that does not exist.

    The message reads `<key>=<value>: <what is allowed>`; entry points print it as one line,
    `config error: <message>`, and exit with code 2."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class DataUnavailable(ImgretError):
    """Images could not be found, downloaded or verified."""


class WeightsUnavailable(ImgretError):
    """Pretrained weights could not be loaded (typically: no network)."""


class BadImage(ImgretError):
    """One image file cannot be used: unreadable, truncated, empty, not an image, or too large."""

    def __init__(self, path: str, reason: str, kind: str = "damaged"):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, " ".join(reason.split())  # one line, for bad_images.txt
        self.kind = kind  # not_an_image | too_many_pixels | damaged: the web server answers 415, 413 or 400


class TrackingUnavailable(ImgretError):
    """The MLflow tracking store cannot be reached, or is damaged."""


class TrackingRefused(ImgretError):
    """The tracking store answered, and refused what imgret asked of it (a bad value, a deleted experiment)."""


def allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


def bad_value(key: str, value, what_is_allowed: str) -> ConfigError:
    """The one form of a configuration error: `key=value: what is allowed`."""
    return ConfigError(f"{key}={shown(value)}: {what_is_allowed}", key=key)


def shown(value) -> str:
    """A value as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def one_line(error: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def whole(value, low: int, high: int | None = None) -> bool:
    """A whole number (not a bool) from `low` to `high` (None: no upper bound)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def check_whole(key: str, value, low: int, what: str = "") -> None:
    if not whole(value, low):
        raise bad_value(key, value, f"a whole number{what} >= {low}")


def check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise bad_value(key, value, "true or false")


def exit_code(error: BaseException) -> int:
    """2 for a configuration error (nothing ran), 1 for any other error imgret explains."""
    return 2 if isinstance(error, ConfigError) else 1


def exit_with(error: ImgretError) -> NoReturn:
    """An entry point's answer to an error it explains: one line on stderr, `config error: ...` (exit 2) or
    `<kind> error: ...` / `error: ...` (exit 1)."""
    kind = "config error" if isinstance(error, ConfigError) else \
        "tracking error" if isinstance(error, (TrackingUnavailable, TrackingRefused)) else "error"
    print(f"{kind}: {error}", file=sys.stderr)
    sys.exit(exit_code(error))


class StorageError(ImgretError):
    """A folder imgret writes to is full, read-only, or vanished while a run wrote to it."""


def storage_error(error: BaseException, folder, key: str) -> StorageError | None:
    """`error` as one line naming the path, what happened to the folder under `key` (paths.cache) and what to do,
    when something in its chain says the folder cannot take writes (no space, over quota, read-only, gone);
    None for any other error."""
    import errno
    import os
    import shutil

    seen, link = set(), error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno is not None:
            path = link.filename or folder
            if link.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
                return StorageError(f"{path}: no space left on the disk of {key}={folder} ({free / 2**20:,.1f} MB "
                                    f"free): free space there or set {key} to a folder on a larger disk; started "
                                    "again, the run resumes from what was written")
            if link.errno == errno.EROFS:
                return StorageError(f"{path}: the file system of {key}={folder} is read-only: remount it writable or "
                                    f"set {key} to a writable folder")
            if link.errno == errno.ENOENT and not os.path.isdir(folder):
                return StorageError(f"{path}: {key}={folder} vanished while the run wrote to it (removed or "
                                    "unmounted?): keep it in place during a run and start the run again")
        link = link.__cause__ or link.__context__
    return None


def free_space_check(folder, needed_bytes: int, key: str, what: str) -> None:
    """Before a write of about `needed_bytes` under `folder`: StorageError naming both sizes if they do not fit."""
    import shutil

    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise StorageError(f"{folder}: {what} need about {needed_bytes / 2**20:,.1f} MB and the disk of {key} has "
                           f"{free / 2**20:,.1f} MB free: free space there or set {key} to a folder on a larger disk")
