"""`ray job submit --working-dir . -- python -m jobs.score [flags]`: the same as `sdsg score [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
