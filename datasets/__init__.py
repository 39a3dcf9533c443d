"""Data: label conventions, raw readers, processed-layout readers, augmentation, phantom."""
