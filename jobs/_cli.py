"""The console scripts' shared entry point: exit codes, one-line errors, named configs.

    0   done
    1   a failure while working: a traceback (a bug, a crashed worker, a full disk)
    2   the command line, the config or a named input is wrong: one line on stderr, naming it

A job is split in two: `prepare(argv)` parses the arguments, loads and validates the config
and checks the inputs it names (shards, encoder files, the tracking store), then returns the
work as a callable, or None when there is nothing to run (`--print-config`). Only errors from
`prepare` become one-liners, plus the two kinds that are the user's wherever they surface
(`ConfigError`, `SourceError`): a FileNotFoundError or ValueError raised mid-training is not
a usage error, and keeps its traceback. `main(argv)` of each job runs both halves and lets
every exception through, for tests and library callers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from pipeline.config import Config, ConfigError

EXIT_USAGE = 2  # as argparse exits on a bad flag

Work = Callable[[], Any]
Prepare = Callable[[list[str] | None], Work | None]

# Raised while checking what the user named (before any work starts): the user's to fix.
CHECK_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    ValueError,  # ConfigError, argument validation, an empty shard list
)


def always_user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's wherever they are raised: a config error, a bad image source."""
    from pipeline.data.writer import SourceError

    return (ConfigError, SourceError)


def check_errors() -> tuple[type[BaseException], ...]:
    from pipeline.tracking import TrackingUnavailableError

    return (*CHECK_ERRORS, TrackingUnavailableError, *always_user_errors())


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def fail(prog: str, err: BaseException) -> NoReturn:
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def prog_name(script: str, module: str) -> str:
    """`ce-pretrain` when run as the console script, else `python -m jobs.pretrain`."""
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


def run_cli(
    prog: str,
    prepare: Prepare,
    argv: list[str] | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
) -> NoReturn:
    """Run a job as a command: exit 0, 1 (traceback) or 2 (one line); see the module docstring.
    `user_errors`: more exception types that are the user's even while working."""
    try:
        work = prepare(argv)
    except check_errors() + user_errors as err:
        fail(prog, err)
    if work is not None:
        try:
            work()
        except always_user_errors() + user_errors as err:
            fail(prog, err)
    sys.exit(0)


def run_main(prepare: Prepare, argv: list[str] | None = None) -> Any:
    """Both halves, every exception raised: what each job's `main` is."""
    work = prepare(argv)
    return work() if work is not None else None


def check_shards(cfg: Config) -> None:
    """data.train_shards (required) and data.val_shards (if set) name existing shards; the
    error names the key as well as the pattern."""
    from pipeline.data.urls import expand_urls

    for key, urls in (("data.train_shards", cfg.data.train_shards),
                      ("data.val_shards", cfg.data.val_shards)):  # fmt: skip
        if not urls and key == "data.val_shards":
            continue
        try:
            expand_urls(urls)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{key}: {err}") from err


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the YAML configs installed with the package (jobs/configs/*.yaml)."""
    folder = resources.files("jobs") / "configs"
    return {
        Path(item.name).stem: Path(os.fspath(item))
        for item in folder.iterdir()
        if item.name.endswith(".yaml")
    }


def resolve_config(name_or_path: str | None) -> Path | None:
    """A config file: an existing path, or the name of a shipped config (`cifar10` is
    jobs/configs/cifar10.yaml, wherever the package is installed). None stays None (defaults).
    Raises ConfigError naming the argument and the shipped names."""
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(
        f"--config {name_or_path!r}: no such file, and not a shipped config "
        f"(shipped: {', '.join(sorted(shipped))})"
    )
