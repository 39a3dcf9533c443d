"""The command-line programs: preprocess, train, test, predict and the phantom writer.

Each module's ``main(argv)`` returns the exit status. The root scripts (``train.py``, ...) and the
installed console commands (``immseg-train``, ...) call them.
"""
