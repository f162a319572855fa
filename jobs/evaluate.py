"""Entry point for `ray job submit -- python jobs/evaluate.py ...`: same flags as `ngt-ray evaluate`."""

import sys

from ngt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
