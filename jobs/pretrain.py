"""Ray job: DINOv2 pretraining (`reddino pretrain`). Arguments are those of `reddino pretrain --help`.

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py --config reddino/configs/reddino_vits14.yaml --run-name vits14-a data.paths=[/mnt/rbc/patches]

Resume after a stop or a failure: submit the same command again with `--run-name vits14-a --resume`.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("pretrain", __doc__))
