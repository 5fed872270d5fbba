"""``python -m polycom.bench activations|training`` -- the same as ``polycom bench``."""

import sys

from .cli import main

sys.exit(main())
