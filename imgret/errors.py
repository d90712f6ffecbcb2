"""Errors that a user can act on: each message names the bad value and what to do instead; the one check of a
whole number; and how an entry point turns an error into its one line and exit code."""
import os
import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")


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
        self.kind = kind  # not_an_image | bad_shape | too_many_pixels | damaged: the web server answers 415, 413, 400


class TrackingUnavailable(ImgretError):
    """The MLflow tracking store cannot be reached, or is damaged."""


class TrackingRefused(ImgretError):
    """The tracking store answered, and refused what imgret asked of it (a bad value, a deleted experiment)."""


def allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


def bad_value(key: str, value, what_is_allowed: str) -> ConfigError:
    """The one form of a configuration error: `key=value: what is allowed`."""
    return ConfigError(f"{key}={shown(value)}: {what_is_allowed}", key=key)


SHOWN_CHARACTERS = 80  # a longer value is cut in an error line: a request's megabyte field is not echoed whole


def shown(value) -> str:
    """A value as it would be typed on the command line; a long one cut, with its length said."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS - 20]}... ({len(text):,} characters)"


def one_line(error: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def whole(value, low: int, high: int | None = None) -> bool:
    """A whole number (not a bool) from `low` to `high` (None: no upper bound)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def number(value) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def hydra_refusal(error: BaseException, argv: list[str]) -> ConfigError | None:
    """Hydra's own refusal of a command line as one line: a config group option that does not exist
    (`method=nosuch`), a key the composed config does not have (`method.refine_factor=5` on a method without it),
    an override that does not parse. None for any other error."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    def typed(key: str) -> tuple[str, str]:  # the override as the user typed it: (key with its prefix, value)
        for argument in argv:
            name, _, value = argument.partition("=")
            if name.lstrip("+~") == key:
                return name, value
        return key, ""

    if isinstance(error, MissingConfigException) and "/" in (error.missing_cfg_file or ""):
        group, option = error.missing_cfg_file.rsplit("/", 1)
        options = ", ".join(error.options or []) or "none"
        return bad_value(typed(group)[0], option, f"one of {options} (the files in imgret's conf/{group}/)")
    if isinstance(error, OverrideParseException):
        return ConfigError(f"an override Hydra cannot parse: {one_line(error).split(': ', 1)[-1]} (key=value, a "
                           "sweep key=a,b; the grammar: hydra.cc/docs/advanced/override_grammar/basic)")
    if isinstance(error, HydraException):
        cause = error.__cause__
        quoted = str(error).split("'")
        key = quoted[1] if str(error).startswith("Could not override '") and len(quoted) > 2 else None
        if key and cause is not None and "not in struct" in str(cause):
            name, value = typed(key)
            return bad_value(name, value, f"a key of the composed config: it has no {key} (every key of every "
                                          f"group: `python -m imgret.cli`; +{key}=... would add one)")
        reason = one_line(error).split(": ", 1)[-1] + (f" ({one_line(cause).split(': ', 1)[-1]})" if cause else "")
        return ConfigError(f"the command line: {reason}")
    return None


def run_hydra_app(app: Callable[[], T]) -> T:
    """Run a `@hydra.main` function with Hydra's refusals of the command line said in one line, exit 2, before
    any work (Hydra prints them over many lines, exit 1), and an error imgret explains that ends a sweep in one
    line too. With HYDRA_FULL_ERROR=1 set by the user, Hydra's own report stands."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return app()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors to this function instead of printing them
    try:
        return app()
    except ImgretError as error:
        exit_with(error)
    except Exception as error:
        refusal = hydra_refusal(error, sys.argv[1:])
        if refusal is None:
            raise
        exit_with(refusal)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
