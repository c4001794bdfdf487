"""`python -m kn_edit.cli ...`: the kn-edit command line."""

import sys

from . import main

sys.exit(main())
