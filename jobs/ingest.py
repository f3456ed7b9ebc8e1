"""Ray job: raw RBC microscopy → reddino Parquet shards (`reddino ingest`). Arguments: `reddino ingest --help`.

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/ingest.py chula /mnt/rbc/raw/chula --out /mnt/rbc/chula-patches --unit patch
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("ingest", __doc__))
