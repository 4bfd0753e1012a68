"""`python -m sdsg_ray ...` == `sdsg ...` (works before the console script is on PATH)."""

import sys

from sdsg_ray.cli import main

sys.exit(main())
