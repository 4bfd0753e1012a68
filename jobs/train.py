"""`ray job submit --working-dir . -- python -m jobs.train [flags]`: the same as `sdsg train [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
