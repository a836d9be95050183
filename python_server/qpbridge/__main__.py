import sys

from qpbridge.cli import main

sys.exit(main())
