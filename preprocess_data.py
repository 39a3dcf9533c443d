"""Turn raw NIfTI cases into training slices and label-free test volumes.

The program is :mod:`commands.preprocess`, installed as ``immseg-preprocess`` too;
``python preprocess_data.py --help`` lists its options.
"""

import sys

from commands.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
