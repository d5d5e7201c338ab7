"""Train a student (ORPO / DPO / SimPO / SFT): the entrypoint for
``ray job submit -- python jobs/train_student.py --config jobs/recipes/train_text_orpo_local.yaml``."""

import sys

from mint_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
