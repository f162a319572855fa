"""Entry point for `ray job submit -- python jobs/benchmark.py ...`: same flags as `ngt-ray benchmark`."""

import sys

from ngt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
