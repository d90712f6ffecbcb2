"""Errors that a user can act on: each message names the bad value and what to do instead."""


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
