"""`ray job submit --working-dir . -- python -m jobs.export [flags]`: the same as `sdsg export [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
