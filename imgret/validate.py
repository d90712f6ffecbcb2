"""The whole configuration, checked before any work: no MLflow run, download or extraction happens first.

Each check raises `ConfigError` reading `<key>=<value>: <what is allowed>`; the entry points print it as
one line and exit with code 2. Bounds that need the data (k or nlist against the gallery's size) are checked
again once the images are listed, still before the MLflow run starts.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from imgret.errors import bad_value, check_bool, check_whole, whole

DEVICES = ("auto", "cpu", "cuda")


def check_level(cfg) -> None:
    """`level` picks a rung of the method's `levels` (its query knob, cheap to exhaustive): checked before anything
    reads the knob, whose interpolation would otherwise fail deep inside the config library."""
    level = cfg.get("level")
    if level is None:
        return
    levels = cfg.method.get("levels") if "method" in cfg else None
    top = len(levels) - 1 if levels else None
    if not whole(level, 0, top):
        rungs = f"a whole number from 0 to {top} (method={cfg.method.name}'s levels: {list(levels)})" if levels \
            else "a whole number >= 0, or null"
        raise bad_value("level", level, rungs)


TOP_LEVEL_CODES = (("quantisation", "none", "keeps full-precision rows"), ("refine_factor", 1, "re-ranks nothing"))


def unused_top_level(cfg) -> tuple[str, object, str] | None:
    """A top-level `quantisation` or `refine_factor` that the run's method does not take (its section has no such
    key, so the run would ignore it): (key, value, what is allowed), or None."""
    method = cfg.get("method") or {}
    for key, idle, words in TOP_LEVEL_CODES:
        value = cfg.get(key, idle)
        if value not in (idle, None) and key not in method:
            return key, value, f"{idle} for method={method.get('name')}, which {words} (docs/how-to/quantisation.md)"
    return None


def check_run_settings(cfg) -> None:
    """The keys of config.yaml itself: devices, sizes, seeds, and the extract and search groups."""
    check_level(cfg)
    unused = unused_top_level(cfg)
    if unused:
        raise bad_value(*unused)
    if cfg.device not in DEVICES:
        raise bad_value("device", cfg.device, f"one of {', '.join(DEVICES)}")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise bad_value("device", "cuda", "a device torch can see: torch sees no CUDA device here; use cpu or auto")
    if cfg.threads is not None:
        check_whole("threads", cfg.threads, 1, " of threads, or null for every core,")
    check_whole("batch_size", cfg.batch_size, 1, " of images per batch")
    if cfg.num_workers != "auto" and not whole(cfg.num_workers, 0):
        raise bad_value("num_workers", cfg.num_workers, "'auto' or a whole number of loader processes >= 0")
    check_whole("seed", cfg.seed, 0)
    for key in ("skip_invalid", "force"):
        check_bool(key, cfg.get(key, False))

    from imgret.embed.options import check_extract

    check_extract(cfg.extract, cfg.device)
    objectives = cfg.get("objectives", [])
    if isinstance(objectives, str):
        objectives = [objectives]
    from imgret.measure.metrics import RUN_METRICS

    if not objectives or not all(name in RUN_METRICS for name in objectives):
        raise bad_value("objectives", list(objectives), f"a list of metric names from {', '.join(RUN_METRICS)}")

    from imgret.measure.cost import Prices
    from imgret.measure.search import SearchSettings

    SearchSettings.check_section(cfg.search)
    Prices.check_section(cfg.get("cost") or {})


def check_tracking(tracking) -> None:
    """The group's own keys (its type's check), then what the machine decides: the store's folder can be written,
    a server answers."""
    from imgret.track.store import TrackingSettings

    TrackingSettings.check_section(tracking)
    uri = tracking.get("uri")
    if uri.startswith("sqlite:///"):
        check_writable("tracking.uri", Path(uri[len("sqlite:///"):]).parent, uri)
    if uri.startswith(("http://", "https://")):
        from imgret.track.store import probe_server

        probe_server(uri)


def check_writable(key: str, folder: Path, value=None) -> None:
    """A file can be written in the folder, or the folder can be made (nothing is made here)."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".imgret-write-test-"):
            pass
    except OSError as error:
        raise bad_value(key, value if value is not None else folder,
                        f"a folder this process can write to ({getattr(error, 'strerror', None) or error})") from error


def check_filter(row_filter, source) -> None:
    """The filter group's own keys (its type's check), and a label filter only on a source with classes."""
    from imgret.index.filters import FilterSettings

    FilterSettings.check_section(row_filter)
    if row_filter.get("kind", "none") == "label" and not getattr(source, "labelled", True):
        raise bad_value("filter", "label", f"none or attribute for data={source.name}, whose vectors have no classes")


def invalid_point(cfg) -> str | None:
    """Why this combination of settings cannot run (a sweep with skip_invalid=true skips it), or None: a method's
    own combinations (nprobe > nlist, ...), and a precision its extraction backend does not run."""
    from imgret.embed.options import invalid_extract_combination
    from imgret.index.methods import invalid_combination

    check_level(cfg)  # a level past the method's rungs: refused in one line before its knob is read below
    unused = unused_top_level(cfg)
    if unused:
        return f"{unused[0]}={unused[1]}: {unused[2]}"
    extract = cfg.get("extract") or {}
    row_filter = cfg.get("filter") or {}
    if row_filter.get("kind") != "attribute" and row_filter.get("selectivity") is not None:
        return f"filter={row_filter.get('kind')} takes no selectivity"
    if row_filter.get("kind") == "attribute" and row_filter.get("selectivity") is None:
        return "filter=attribute needs a selectivity"
    return invalid_combination(cfg.method) or invalid_extract_combination(extract.get("backend", "torch"),
                                                                         extract.get("precision", "auto"))


def validate_config(cfg) -> None:
    """Every group and key of one run's composed config. Cheap: nothing is built, listed or downloaded.
    The light checks come first, so that they answer before torch, faiss and timm are imported."""
    check_run_settings(cfg)
    check_tracking(cfg.tracking)
    from imgret.sources.base import VectorSource
    from imgret.sources.registry import check_data, source_of
    from imgret.index.methods import validate_search
    from imgret.embed.models import describe_encoder, output_dim
    from imgret.embed.options import DEFAULT_DECODER

    source = source_of(cfg.data)
    check_filter(cfg.get("filter") or {}, source)
    check_data(cfg.data)
    if isinstance(source, VectorSource):  # no model: the vectors' own dimension and count
        gallery_size, dim = source.shape(cfg.data)
        validate_search(cfg.method, cfg.k, gallery_size=gallery_size, dim=dim)
    else:
        description = describe_encoder(cfg.model, cfg.seed)  # family, arch, image size, checkpoint, pretrained tag
        if cfg.extract.get("decoder", DEFAULT_DECODER) == "torchvision":
            from imgret.embed.preprocess import check_tensor_preprocessing

            check_tensor_preprocessing(description["preprocessing"])
        validate_search(cfg.method, cfg.k, dim=output_dim(cfg.model))
    check_writable("paths.cache", Path(str(cfg.paths.cache)))
