"""t2i-data: the command line. Thin on purpose: parse options, then call the packages.

Each command imports its package lazily so `t2i-data --help` stays fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from shards.errors import UserError

app = typer.Typer(
    name="t2i-data",
    help=(
        "Build a PixArt-alpha-class text-to-image model on a budget.\n\n"
        "  t2i-data caption --src sam/ --out out/     dense VLM captions into Parquet shards\n\n"
        "  t2i-data stats laion.parquet out/          how informative are the captions (paper Table 1)\n\n"
        "  t2i-data train --shards out/               train PixArt-alpha on the shards\n\n"
        "  t2i-data demo                              the whole recipe on a synthetic world, on CPU"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (bad input) into a one-line message and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.secho("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130)

    return wrapper


# --- stats (dataset_stats/) ------------------------------------------------------------------
# (filled in by the stats work)

# --- caption (autolabel/) --------------------------------------------------------------------
# (filled in by the caption work)

# --- features / train / sample / export / import-dit (t2i/) ----------------------------------
# (filled in by the trainer work)

# --- demo ------------------------------------------------------------------------------------
# (filled in by the demo work)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
