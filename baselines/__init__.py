"""Other frameworks run beside ours on the same cases, folds and scorer."""
