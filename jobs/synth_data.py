"""Generate a synthetic cohort: the entrypoint for
``ray job submit -- python jobs/synth_data.py --config jobs/recipes/synth_local.yaml [--task tissue_type]``."""

import sys

from mint_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "synth", *sys.argv[1:]]))
