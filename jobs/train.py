"""`ray job submit --working-dir . -- python -m jobs.train [flags]`: the same as `sdsg train [flags]`."""

import sys

from sdsg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
