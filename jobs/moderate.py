"""Entry point for `ray job submit -- python jobs/moderate.py ...`: same flags as `ngt-ray moderate`."""

import sys

from ngt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["moderate", *sys.argv[1:]]))
