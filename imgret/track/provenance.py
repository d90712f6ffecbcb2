"""What produced a run: imgret's code, the libraries' versions and the machine, as tags and one digest.

A finished sweep point is reused only by a point of the same provenance (`imgret.provenance`): after a change to
imgret's code, a library upgrade or on another machine, every point runs again. The code digest covers the
package's source and its configs, not the README or the tests, so editing those reruns nothing; the git commit and
whether the tree was clean are tags beside it, for a reader, not part of the digest (a wheel has no git).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
from importlib import metadata, resources
from pathlib import Path

from imgret.embed.precision import cpu_info

PROVENANCE_TAG = "imgret.provenance"
CODE_TAG = "imgret.code_digest"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PROJECT_ROOT = PACKAGE_DIR.parent
# What can change a figure: the search and extraction libraries, and what runs and tracks them.
LIBRARIES = ("torch", "torchvision", "timm", "open_clip_torch", "faiss-cpu", "faiss-gpu", "mlflow",
             "pytorch-lightning", "hydra-core", "numpy")
CODE_SUFFIXES = (".py", ".yaml", ".html")
# CPU features that change which kernels run (and so the timings); the full flag list is digested as well.
NOTABLE_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                     "amx_tile")


def _code_files() -> dict[str, Path]:
    """imgret's source and configs by a stable name: the package's files, and the configs (`imgret.conf`),
    which an editable install keeps in conf/ at the repository's top and a wheel inside the package."""
    files = {}
    roots = [("imgret", PACKAGE_DIR), ("imgret/conf", Path(str(resources.files("imgret.conf"))))]
    for prefix, root in roots:
        for folder, subfolders, names in os.walk(root, followlinks=True):  # conf/experiment links to experiments/
            subfolders[:] = [name for name in subfolders if name != "__pycache__"]
            for name in names:
                path = Path(folder) / name
                if path.suffix in CODE_SUFFIXES:
                    files[f"{prefix}/{path.relative_to(root).as_posix()}"] = path
    return files


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    digest = hashlib.sha256()
    for name, path in sorted(_code_files().items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    versions = {}
    for library in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[library] = metadata.version(library)
    return versions


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, str]:
    """The machine as far as it changes a figure: CPU model, its flags, cores and the accelerator."""
    cpu = cpu_info()
    flags = cpu["flags"].split()
    found = {"cpu": cpu["model"], "cpu_count": str(os.cpu_count()),
             "cpu_flags": " ".join(flag for flag in NOTABLE_CPU_FLAGS if flag in flags) or "none of note",
             "cpu_flags_digest": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12],
             "gpu": "none"}
    import torch

    if torch.cuda.is_available():
        found["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return found


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def provenance_tags() -> dict[str, str]:
    """Tags that say what produced a run, with `imgret.provenance`, the digest of code, versions and machine."""
    versions, host = library_versions(), machine()
    identity = {"code": code_digest(), "versions": versions, "machine": {k: v for k, v in host.items()
                                                                         if k != "cpu_flags"}}
    tags = {PROVENANCE_TAG: hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16],
            CODE_TAG: code_digest(), "git_commit": _git(["rev-parse", "HEAD"]) or "unknown",
            **{f"version.{library}": version for library, version in versions.items()}, **host}
    if tags["git_commit"] != "unknown":
        tags["git_dirty"] = str(bool(_git(["status", "--porcelain", "--untracked-files=no"])))
    return tags


def describe(tags: dict[str, str]) -> str:
    """One provenance in a line, from a run's tags: code, commit, the main libraries' versions, the machine."""
    versions = ", ".join(f"{library} {tags[f'version.{library}']}" for library in ("torch", "faiss-cpu", "timm",
                                                                                     "numpy")
                         if f"version.{library}" in tags)
    commit = tags.get("git_commit", "unknown")[:10] + (" (uncommitted changes)" if tags.get("git_dirty") == "True"
                                                       else "")
    return (f"code {tags.get(CODE_TAG, 'unknown')} (git {commit}); {versions}; {tags.get('cpu', 'unknown CPU')}, "
            f"{tags.get('cpu_count', '?')} cores, flags {tags.get('cpu_flags', 'unknown')}, "
            f"GPU {tags.get('gpu', 'unknown')}")
