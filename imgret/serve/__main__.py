"""`python -m imgret.serve [overrides]`: the web demo over a run's gallery, model and indexes.

Composes conf/serve.yaml (a run's config plus `serve.*`), checks it, reuses or makes the gallery's store and
each index (with progress), then serves on serve.host:serve.port (127.0.0.1 unless told otherwise).
Exit codes: 0 stopped; 2 a configuration error (one line); 1 another error explained in one line.
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from imgret.errors import ImgretError, bad_value, exit_with, run_hydra_app

log = logging.getLogger("imgret.serve")


def serve_settings(cfg: DictConfig):
    from imgret.serve.app import ServeSettings

    serve = cfg.serve
    if not isinstance(serve.host, str) or not serve.host:
        raise bad_value("serve.host", serve.host, "an address to listen on, such as 127.0.0.1")
    if not isinstance(serve.port, int) or not 0 <= serve.port <= 65535:
        raise bad_value("serve.port", serve.port, "a port number from 0 to 65535 (0: any free port)")
    for key in ("max_upload_mb", "max_image_pixels", "max_k", "decode_budget_mp", "decode_wait_s"):
        value = serve.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise bad_value(f"serve.{key}", value, "a number > 0")
    for key in ("nprobe", "ef_search"):
        values = serve.get(key) or []
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise bad_value(f"serve.{key}", list(values), "a list of whole numbers >= 1")
    if not serve.get("indexes"):
        raise bad_value("serve.indexes", serve.get("indexes"), "at least one method config, e.g. serve.indexes.flat")
    return ServeSettings(host=serve.host, port=int(serve.port), max_upload_bytes=int(serve.max_upload_mb * 2**20),
                         max_image_pixels=int(serve.max_image_pixels), max_k=int(serve.max_k), default_k=int(cfg.k),
                         decode_budget_pixels=int(serve.decode_budget_mp * 1e6), decode_wait_s=float(serve.decode_wait_s))


def start(cfg: DictConfig) -> None:
    from imgret.validate import validate_config

    validate_config(cfg)
    settings = serve_settings(cfg)
    from imgret.embed.models import output_dim
    from imgret.index.methods import validate_search

    from imgret.index.methods import MethodSettings

    methods = [MethodSettings.of(method) for method in cfg.serve.indexes.values()]
    for method in methods:  # before any listing, extraction or build
        validate_search(method, cfg.k, dim=output_dim(cfg.model))

    import uvicorn

    from imgret.api import open_retriever
    from imgret.embed.options import ExtractSettings
    from imgret.options import Options
    from imgret.serve.app import create_app

    variants = {"nprobe": list(cfg.serve.get("nprobe") or []), "ef_search": list(cfg.serve.get("ef_search") or [])}
    retriever = open_retriever(ExtractSettings.from_config(cfg), Options.of(cfg.data), methods,
                               variants)
    retriever.warm_up(int(cfg.k))
    app = create_app(retriever, settings)
    log.info("gallery: %d images (%s); indexes: %s", len(retriever.gallery), retriever.gallery.path.name,
             ", ".join(retriever.indexes))
    log.info("serving the demo at http://%s:%d/ (API docs at /docs); Ctrl-C stops it", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)


def main() -> None:
    """`python -m imgret.serve` and `imgret-serve`: Hydra's refusals of the command line in one line (exit 2)."""
    run_hydra_app(hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://imgret.conf", config_name="serve")
def hydra_main(cfg: DictConfig) -> None:
    try:
        start(cfg)
    except ImgretError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
