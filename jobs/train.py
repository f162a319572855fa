"""Entry point for `ray job submit -- python jobs/train.py ...`: same flags as `ngt-ray train`."""

import sys

from ngt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
