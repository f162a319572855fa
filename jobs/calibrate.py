"""Entry point for `ray job submit -- python jobs/calibrate.py ...`: same flags as `ngt-ray calibrate`."""

import sys

from ngt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
