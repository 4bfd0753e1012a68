"""`ray job submit --working-dir . -- python -m jobs.pipeline [flags]`: the same as `sdsg pipeline [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
