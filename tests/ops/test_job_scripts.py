"""Every `jobs/*.py` entrypoint is the CLI command it names: `--help` shows that command's usage (no cluster needed)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]
SCRIPTS = sorted(p.name for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_"))

# One interpreter for all scripts (importing the CLI costs seconds): each runs as `python jobs/x.py --help` would.
RUNNER = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, "jobs")
out = {}
for script in json.loads(sys.argv[1]):
    sys.argv = [f"jobs/{script}", "--help"]
    buf, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(f"jobs/{script}", run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    out[script] = [code, buf.getvalue(), err.getvalue()]
print(json.dumps(out))
"""


def test_every_job_script_help_is_its_commands():
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(SCRIPTS)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    assert {"embed.py", "probe.py", "classify.py", "pretrain.py"} <= set(results)
    for script, (code, out, err) in results.items():
        assert code in (0, None), (script, err)
        assert f"Usage: python jobs/{script}" in out and "--help" in out, (script, out, err)
