"""Errors that a user can act on: each message names the bad value and what to do instead."""


class ImgretError(Exception):
    """Base class: an error imgret explains, as opposed to a bug."""


class ConfigError(ImgretError, ValueError):
    """A configuration value is out of range or names something that does not exist."""


class DataUnavailable(ImgretError):
    """Images could not be found, downloaded or verified."""


class WeightsUnavailable(ImgretError):
    """Pretrained weights could not be loaded (typically: no network)."""


def allowed(values) -> str:
    return ", ".join(repr(v) for v in values)
