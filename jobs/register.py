"""Ray job: register a pretrained backbone in the MLflow model registry (`reddino models register`).
Arguments: `reddino models register --help`.

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/register.py /shared/runs/vits14-a --name reddino-vits14 --eval-json /shared/eval/vits14-a/metrics.json
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("models register", __doc__))
