"""`ray job submit --working-dir . -- python -m jobs.evaluate [flags]`: the same as `sdsg evaluate [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
