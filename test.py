"""Score trained networks on held-out volumes, label-free.

The program is :mod:`commands.test`, installed as ``immseg-test`` too;
``python test.py --help`` lists its options.
"""

import sys

from commands.test import main

if __name__ == "__main__":
    sys.exit(main())
