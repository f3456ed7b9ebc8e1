"""Ray job: frozen-feature kNN / linear-probe evaluation (`reddino evaluate`). Arguments: `reddino evaluate --help`.

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py --model models:/reddino-vits14@candidate --data /mnt/rbc/chula-cells --protocol kfold --out /shared/eval/vits14-a
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("evaluate", __doc__))
