"""`ray job submit --working-dir . -- python -m jobs.import_generator SOURCE [flags]`: the same as `sdsg import`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["import", *sys.argv[1:]]))
