"""`ray job submit --working-dir . -- python -m jobs.make_dataset [flags]`: the same as `sdsg make-dataset [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-dataset", *sys.argv[1:]]))
