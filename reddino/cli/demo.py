"""`reddino demo`."""

from __future__ import annotations

import typer


def demo(
    out: str = typer.Option("reddino-demo", "--out", help="Folder for everything the demo makes."),
    with_sweep: bool = typer.Option(False, "--with-sweep", help="Add a small Optuna/ASHA ablation sweep."),
    quick: bool = typer.Option(False, "--quick", help="A reduced size (smoke test)."),
) -> None:
    """The whole platform on this machine: synth → Parquet → pretrain → evaluate → registry."""
    from reddino.demo import run_demo

    run_demo(out, quick=quick, with_sweep=with_sweep)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
