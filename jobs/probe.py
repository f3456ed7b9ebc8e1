"""Ray job: fit, score and register a probe on frozen features (`reddino probe fit`). Arguments: `reddino probe fit --help`.

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/probe.py --model models:/reddino-vits14@champion --data /mnt/rbc/chula-cells --exclude-classes 12 --register chula-probe
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("probe fit", __doc__))
