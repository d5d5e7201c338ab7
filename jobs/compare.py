"""Train or load every arm (base, SFT, DPO, ORPO, teacher, RAG), evaluate all on one test split, one report:
``ray job submit -- python jobs/compare.py --config jobs/recipes/compare_rare_disease.yaml``."""

import sys

from mint_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
