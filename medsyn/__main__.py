import sys

from medsyn.cli import main

sys.exit(main())
