"""Build preference pairs from a cohort with a teacher: the entrypoint for
``ray job submit -- python jobs/build_preferences.py --config jobs/recipes/prod_preferences_tissue.yaml``."""

import sys

from mint_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["preferences", *sys.argv[1:]]))
