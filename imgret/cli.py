"""What the command line shows: `--help` built from the configs themselves, comments included."""
from __future__ import annotations

from importlib import resources

GROUPS_SKIPPED = ("hydra",)


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# @package"):
            continue
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _without_hydra_section(text: str) -> list[str]:
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("hydra:"):
            skipping = True
        elif skipping and line and not line.startswith((" ", "#")):
            skipping = False
        if not skipping:
            kept.append(line)
    return kept


def help_text(command: str = "imgret-run", primary: str = "config.yaml") -> str:
    """Every config group with each option's first comment line, then the primary config as written (its
    comments say what each key means), then Hydra's flags. `$` is doubled: Hydra fills the template with
    string.Template."""
    conf = resources.files("imgret.conf")
    lines = [f"{command}: image retrieval end to end (images -> embeddings -> index -> search -> recall, "
             "timings, memory -> MLflow).", "",
             f"Usage: {command} [key=value ...]     one run",
             f"       {command} -m [key=a,b ...]    a sweep (Hydra multirun): one run per combination", "",
             "Config groups (choose with group=option):"]
    for group in sorted((d for d in conf.iterdir() if d.is_dir() and not d.name.startswith(("_", *GROUPS_SKIPPED))),
                        key=lambda d: d.name):
        prefix = "+" if group.name == "experiment" else ""
        lines.append(f"  {prefix}{group.name}=")
        for option in sorted((f for f in group.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name):
            lines.append(f"      {option.name[:-5]:<18} {_first_comment(option.read_text())}")
    lines += ["", f"Keys and their defaults (conf/{primary}; any key can be set, e.g. k=5 method.nprobe=16):", ""]
    lines += ["  " + line for line in _without_hydra_section(conf.joinpath(primary).read_text())]
    lines += ["", "Hydra's flags:", "$FLAGS_HELP"]
    return "\n".join(line.replace("$", "$$") if "$FLAGS_HELP" not in line else line for line in lines)


def reference_markdown() -> str:
    """The docs site's configuration reference: every config group with its options, and every option's keys with
    their defaults and comments, read from the configs as `--help` reads them (the site's build generates the page
    from it, tools/mkdocs_hooks.py; `python -m imgret.cli` prints it)."""
    conf = resources.files("imgret.conf")
    lines = ["# Configuration reference", "",
             "Generated from `conf/` when the site is built, by the code behind `imgret-run --help` "
             "(`python -m imgret.cli` prints it). Any key can be set on the command line, e.g. "
             "`k=5 method.nprobe=16`; a group's option is chosen with `group=option`.", "",
             "## The run's own keys (conf/config.yaml)", "", "```yaml",
             *_without_hydra_section(conf.joinpath("config.yaml").read_text()), "```", ""]
    for group in sorted((d for d in conf.iterdir() if d.is_dir() and not d.name.startswith(("_", *GROUPS_SKIPPED))),
                        key=lambda d: d.name):
        prefix = "+" if group.name == "experiment" else ""
        lines += [f"## {prefix}{group.name}=", ""]
        for option in sorted((f for f in group.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name):
            lines += [f"### {prefix}{group.name}={option.name[:-5]}", "",
                      "```yaml", *option.read_text().rstrip("\n").splitlines(), "```", ""]
    lines += ["## The web demo's keys (conf/serve.yaml)", "", "```yaml",
              *_without_hydra_section(conf.joinpath("serve.yaml").read_text()), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
