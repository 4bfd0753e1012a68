"""`ray job submit --working-dir . -- python -m jobs.cluster [flags]`: the same as `sdsg cluster [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
