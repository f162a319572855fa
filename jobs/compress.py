"""Entry point for `ray job submit -- python jobs/compress.py ...`: same flags as `ngt-ray compress`."""

import sys

from ngt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
