"""`ray job submit --working-dir . -- python -m jobs.serve [flags]`: the same as `sdsg serve [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
