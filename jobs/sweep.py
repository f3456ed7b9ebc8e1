"""Ray job: hyper-parameter sweep on Ray Tune (`reddino sweep`). Arguments are those of `reddino sweep --help`
(the base config is named by the sweep space: `--space hparams` → reddino/configs/sweeps/hparams.yaml, `base: ...`).

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/sweep.py --space hparams --data /mnt/rbc/patches --eval-data /mnt/rbc/cells --trials 16 --concurrency 4 --gpus-per-trial 1 [key.sub=value ...]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("sweep", __doc__))
