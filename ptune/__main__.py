"""`python -m ptune ...` (what `accelerate launch -m ptune train ...` runs)."""

import sys

from ptune.cli import main

sys.exit(main())
