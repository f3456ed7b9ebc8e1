"""The README's "Use a model" block, exactly as written, after `reddino demo --quick` in the same folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _use_a_model_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use a model\n"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.timeout(3600)
@pytest.mark.slow  # the quick demo, then embed, probe fit and classify, each on a local Ray: minutes
def test_use_a_model_section_runs_as_written_after_the_quick_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(REDDINO_HOME=str(tmp_path / "home"), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    subprocess.run(["reddino", "demo", "--quick"], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=1800)
    block = _use_a_model_block()
    assert "reddino-demo-backbone@candidate" in block  # what the demo registers
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=2400)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    store = f"sqlite:///{tmp_path}/reddino-demo/mlflow.db"
    assert f"registry: {store}" in proc.stdout  # `models list` names the store it read
    assert "reddino-demo-backbone" in proc.stdout and "demo-probe" in proc.stdout
    assert (tmp_path / "backbone" / "backbone.safetensors").exists()
    assert (tmp_path / "emb" / "demo" / "_manifest.json").exists()
    summary = (tmp_path / "results" / "demo" / "summary.md").read_text()
    assert "probe probe" not in summary and "linear probe demo-probe v1" in summary
    assert "Downloading artifacts" not in console and "Traceback" not in console
