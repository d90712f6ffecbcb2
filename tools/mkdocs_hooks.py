"""MkDocs hooks: the configuration reference (reference/configuration.md) is generated from conf/ as the site is
built, by the code behind `imgret-run --help`, so adding a config option (a method's yaml) changes no page."""
from __future__ import annotations

from mkdocs.structure.files import File, Files

GENERATED_PAGE = "reference/configuration.md"


def on_files(files: Files, config) -> Files:
    from imgret.cli import reference_markdown

    files.append(File.generated(config, GENERATED_PAGE, content=reference_markdown()))
    return files
