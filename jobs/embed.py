"""Ray job: embeddings of a dataset by Ray Data batch inference (`reddino embed`). Arguments: `reddino embed --help`.

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/embed.py --model models:/reddino-vits14@champion --data /mnt/rbc/patches --out /shared/emb/vits14 --concurrency 8
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("embed", __doc__))
