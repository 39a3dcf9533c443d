"""Write synthetic multi-sequence CMR phantom cases (the embedded default data).

The program is :mod:`commands.phantom`, installed as ``immseg-phantom`` too;
``python make_phantom.py --help`` lists its options.
"""

import sys

from commands.phantom import main

if __name__ == "__main__":
    sys.exit(main())
