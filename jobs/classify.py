"""Ray job: per-cell morphology and per-smear fractions (`reddino classify`). Arguments: `reddino classify --help`.

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/classify.py --model models:/reddino-vits14@champion --probe models:/chula-probe@champion \
        --data /mnt/rbc/new-smears --out /shared/classify/new-smears --concurrency 8
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("classify", __doc__))
