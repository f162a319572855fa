"""Entry point for `ray job submit -- python jobs/demo.py ...`: same flags as `ngt-ray demo`."""

import sys

from ngt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
