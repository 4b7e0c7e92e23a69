"""`python -m gateway.cli`: the same command line as the installed `gateway` script."""

import sys

from gateway.cli.main import main

sys.exit(main())
