"""`python -m prism_assets …`: the project CLI (prism_assets.cli)."""

import sys

from prism_assets.cli import main

sys.exit(main())
