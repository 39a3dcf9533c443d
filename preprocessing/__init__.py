"""Raw multi-sequence CMR -> aligned, normalised 128x128 slices in the seed's processed layout."""
