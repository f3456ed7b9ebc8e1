"""Shared entry for the Ray job scripts: run one `reddino <command>` with this script's arguments.

A job script is `python jobs/<command>.py ARGS...` and behaves exactly like `reddino <command> ARGS...`
(same options, `--config` + `key.sub=value` overrides, same exit codes), so the CLI and the cluster share one
code path. The package is imported only when the script runs, so `--help` works on any machine that has
reddino installed, and a command that this reddino version does not have yet says so instead of crashing.
"""

from __future__ import annotations

import sys


def run(command: str, doc: str | None = None) -> int:
    """Run `reddino <command>` (e.g. "pretrain" or "models register") with this process's arguments."""
    prog = f"python {sys.argv[0]}"
    args = sys.argv[1:]
    try:
        import typer.main

        from reddino.cli import app
    except ImportError as exc:
        print(f"{prog}: reddino is not importable in this job's environment ({exc}); install it in the "
              "cluster image or the runtime env (see jobs/runtime_env.yaml)", file=sys.stderr)
        return 2
    cmd = typer.main.get_command(app)
    for name in command.split():
        sub = getattr(cmd, "commands", {}).get(name)
        if sub is None:
            have = ", ".join(sorted(getattr(cmd, "commands", {})))
            print(f"{prog}: this reddino has no `reddino {command}` command yet (has: {have})", file=sys.stderr)
            if doc and any(a in ("-h", "--help") for a in args):
                print(doc)
                return 0
            return 2
        cmd = sub
    return cmd.main(args=args, prog_name=prog, standalone_mode=True)
