"""`ray job submit --working-dir . -- python -m jobs.ingest [flags]`: the same as `sdsg ingest [flags]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
