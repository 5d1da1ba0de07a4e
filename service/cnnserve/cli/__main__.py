"""``python -m cnnserve.cli`` runs the console script."""

import sys

from cnnserve.cli import main

sys.exit(main())
