"""Train a teacher (fusion classifier or tiny CLIP) on a cohort: the entrypoint for
``ray job submit -- python jobs/train_teacher.py --config jobs/recipes/teacher_rare_disease_fusion.yaml``."""

import sys

from mint_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher", "train", *sys.argv[1:]]))
