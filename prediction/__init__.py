"""Prediction on new, unlabelled patients: native NIfTI in, native label map out."""
