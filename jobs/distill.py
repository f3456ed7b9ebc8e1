"""Ray job: distillation (`reddino distill`). Arguments are those of `reddino distill --help`.

    ray job submit --address "$RAY_ADDRESS" --runtime-env jobs/runtime_env.yaml -- \
        python jobs/distill.py --config distill_vits16 --teacher /mnt/models/dinov3_vitl16_pretrain.pth \
        --teacher-arch vit_large_patch16_dinov3 --student vit_small_patch16_dinov3 --data /mnt/rbc/patches \
        --run-name rbc-vits16-from-l

Resume after a stop or a failure: submit the same command again with `--resume`.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("distill", __doc__))
