"""Move a registry alias (e.g. ``champion``) to a model version if its evaluation beats the holder:
``ray job submit -- python jobs/promote.py --config jobs/recipes/prod_promote_text.yaml``."""

import sys

from mint_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
