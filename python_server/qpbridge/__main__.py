import sys

from qpbridge.cli import main

if __name__ == "__main__":  # importing the module (a tool that imports __main__ files) runs nothing
    sys.exit(main())
