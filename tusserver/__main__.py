"""`python -m tusserver` is `tusserver`."""

import sys

from tusserver.cli import main

sys.exit(main())
