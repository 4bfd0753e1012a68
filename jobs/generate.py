"""`ray job submit --working-dir . -- python -m jobs.generate [flags]`: the same as `sdsg generate [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
