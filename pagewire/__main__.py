"""`python -m pagewire`: the same as the `pagewire` command."""

import sys

from pagewire.cli import main

sys.exit(main())
