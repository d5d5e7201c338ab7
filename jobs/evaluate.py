"""Evaluate a model on a test split (batch generation with Ray Data, the paper's metrics, a report):
the entrypoint for ``ray job submit -- python jobs/evaluate.py --config jobs/recipes/prod_evaluate_text.yaml``."""

import sys

from mint_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
