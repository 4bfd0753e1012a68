"""`ray job submit --working-dir . -- python -m jobs.make_dataset [flags]`: the same as `sdsg make-dataset [flags]`."""

import sys

from sdsg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-dataset", *sys.argv[1:]]))
