"""`ray job submit --working-dir . -- python -m jobs.select [flags]`: the same as `sdsg select [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
