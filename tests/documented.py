"""The commands that the README, the docs (docs/**/*.md) and the config comments document, for the tests that run them.

A test runs a documented command by naming a fragment of it: `documented("hydra/launcher=joblib")` returns the one
documented command that holds that fragment, and fails when none or several do, so a README edit that changes a
command reaches the test that runs it. `smaller()` turns a command into its small form by replacements that must
each apply and by overrides appended after the documented ones (Hydra lets the last one win).
tests/test_readme.py checks that every documented command is named by some test.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"


def pages() -> list[Path]:
    """The README and every page of the docs, where commands are documented."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def documentation_text() -> str:
    """The README and the docs, one after the other."""
    return "\n".join(page.read_text() for page in pages())
SHARED = (PROJECT_ROOT / ".." / "shared").resolve()
# Where a code span in the README's prose is a command rather than a key, a value or a file name.
COMMAND_START = re.compile(r"^(python3? |\.venv/bin/|imgret-\w+ |mlflow |curl |torchrun |srun |/usr/bin/time |"
                           r"\(command -v |eval |source |pip |python -m pip)")
# Code spans in the prose that name a command without being one to run as written.
NAMES = {"python -m imgret.X", "imgret-run", "imgret-report", "imgret-bench", "imgret-serve", "mlflow server",
         "python -m imgret.embed.extract", "torchrun --nproc-per-node=2", "python -m imgret.serve", "mlflow db upgrade",
         "python -m imgret.bench"}
# Settings that only make a documented run quicker to check; they change no figure a test looks at.
QUICK = ("extract.progress=false", "extract.latency_images=4", "search.latency_queries=50", "num_workers=0")


def _bash_line(line: str) -> str:
    """A command without its trailing `# comment`: a # after whitespace and outside quotes, as bash reads it."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.strip()


def readme_commands(text: str, name: str = "README.md") -> list[tuple[str, str]]:
    """(command, where) for every command in a page (`name`: the README, or a docs page): bash blocks line by line,
    `$ ` lines of transcripts, python blocks whole, and code spans in the prose that start like a command."""
    found = []
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        lang, body = block.group(1), block.group(2)
        line_no = text.count("\n", 0, block.start()) + 2
        if lang == "python":
            found.append((body, f"{name}:{line_no}"))
            continue
        for offset, line in enumerate(body.splitlines()):
            line = line.strip()
            if lang == "bash" and line and not line.startswith("#"):
                found.append((_bash_line(line), f"{name}:{line_no + offset}"))
            elif not lang and line.startswith("$ "):
                found.append((line[2:], f"{name}:{line_no + offset}"))
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    for match in re.finditer(r"`([^`\n]+)`", prose):
        span = match.group(1)
        if COMMAND_START.match(span) and span not in NAMES:
            found.append((span, f"{name}:{prose.count(chr(10), 0, match.start()) + 1}"))
    return found


def config_examples() -> list[tuple[str, str]]:
    """(command, where) for the examples in conf/'s comments: `python -m ...` comment lines, and the override
    lists given as e.g. `...` (run as `python -m imgret.run <overrides>`, or imgret.serve for conf/serve.yaml)."""
    found = []
    for path in sorted((PROJECT_ROOT / "conf").rglob("*.yaml")):
        where = path.relative_to(PROJECT_ROOT).as_posix()
        entry = "python -m imgret.serve" if path.name == "serve.yaml" else "python -m imgret.run"
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.lstrip().startswith("#"):
                continue
            comment = line.lstrip()[1:].strip()
            if comment.startswith("python -m"):
                found.append((comment, f"{where}:{number}"))
            for span in re.findall(r"e\.g\. `([^`]+)`", comment):
                if not span.startswith("python"):
                    found.append((f"{entry} {span}", f"{where}:{number}"))
    return found


def documented_commands() -> dict[str, list[str]]:
    """Every documented command, once, with every place that shows it."""
    commands: dict[str, list[str]] = {}
    documented_pages = [readme_commands(page.read_text(), page.relative_to(PROJECT_ROOT).as_posix()) for page in pages()]
    for command, where in [found for page in documented_pages for found in page] + config_examples():
        commands.setdefault(command, []).append(where)
    return commands


def documented(fragment: str) -> str:
    """The one documented command that is `fragment`, or else the one that contains it."""
    commands = documented_commands()
    if fragment in commands:
        return fragment
    holding = [command for command in commands if fragment in command]
    assert len(holding) == 1, f"{len(holding)} documented commands hold {fragment!r}: {holding}"
    return holding[0]


def smaller(command: str, replacements: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> str:
    """The command with each `old` replaced by `new` (each must occur) and `extra` words appended."""
    for old, new in (replacements or {}).items():
        assert old in command, f"{old!r} is no longer in the documented command {command!r}"
        command = command.replace(old, new)
    return " ".join([command, *(shlex.quote(word) for word in extra)])


def sandbox(folder: Path) -> Path:
    """A working folder laid out like the checkout's neighbourhood: ../shared (the real data) and conf/ resolve as
    they do from the repository, while .cache/imgret, mlruns/, outputs/ and multirun/ land inside it."""
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    if not (folder / "shared").exists():
        (folder / "shared").symlink_to(SHARED, target_is_directory=True)
    if not (work / "conf").exists():
        (work / "conf").symlink_to(PROJECT_ROOT / "conf", target_is_directory=True)
    return work


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's bin folder first on PATH, so `python`, `imgret-run`, `mlflow` and `torchrun` are the ones
    of the environment under test."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


IN_PROCESS = re.compile(r"^python -m imgret\.run [^|&;<>$`]*$")


def run_imgret_here(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m imgret.run ...` through the same entry point and argv, in this process: a command whose work
    takes a second would otherwise spend eight importing torch, timm, Lightning, faiss and MLflow. Process-level
    behaviour (signals, ranks, launchers, console scripts) has its own subprocess tests."""
    import contextlib
    import io
    import signal

    from hydra.core.global_hydra import GlobalHydra

    import imgret.run

    argv, cwd_before, handlers = ["imgret-run", *shlex.split(command)[3:]], os.getcwd(), {
        sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    out, err, code = io.StringIO(), io.StringIO(), 0
    GlobalHydra.instance().clear()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                _replaced(sys, "argv", argv):
            imgret.run.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(cwd_before)
        GlobalHydra.instance().clear()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        import logging

        logging.getLogger().handlers.clear()  # Hydra's handlers write to the captured streams
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


class _replaced:
    def __init__(self, owner, name, value):
        self.owner, self.name, self.value = owner, name, value

    def __enter__(self):
        self.before = getattr(self.owner, self.name)
        setattr(self.owner, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.before)


def run_command(command: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
                check: bool = True, in_process: bool = True) -> subprocess.CompletedProcess:
    """Run a command line as a reader would paste it: in bash, or for a plain `python -m imgret.run ...` (no
    shell syntax, no environment of its own) through imgret's entry point in this process."""
    if in_process and env is None and IN_PROCESS.match(command):
        result = run_imgret_here(command, cwd)
    else:
        result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                env=environment(env))
    if check:
        assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def run_python(code: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a documented python block in a fresh interpreter of the environment under test."""
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=environment())
    assert result.returncode == 0, f"{code}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def docs_study(command: str, tmp_path, tiny_subset_zip, *extra: str):
    """A docs study command at the real archive's 4-class subset (its own checksum), in a sandbox of its own and a
    process of its own: MLflow keeps one store per tracking URI in a process, so an in-process run with the default
    relative URI would bind it to this sandbox for every later in-process run of the same test worker."""
    archive, digest = tiny_subset_zip
    work = sandbox(tmp_path)
    run_command(smaller(command, {"data.archive=../shared/data/tiny-imagenet-200.zip":
                                  f"data.archive={archive} data.checksums=[{digest}]"}, ("nlist=8", *QUICK, *extra)), work,
                in_process=False)
    return work


def run_small(command: str, tmp_path, *extra: str):
    """A documented `python -m imgret.run` command in its own process with its cache and tracking store under
    `tmp_path` (and `extra` overrides appended): the MLflow run it recorded (a pandas row)."""
    command = smaller(command, None, (*extra, f"paths.cache={tmp_path / 'cache'}",
                                      f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                      f"hydra.run.dir={tmp_path / 'out'}"))
    done = subprocess.run(command, shell=True, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env=environment())
    assert done.returncode == 0, done.stderr[-2000:]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["imgret"]).iloc[0]
