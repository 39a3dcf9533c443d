"""Training-loop building blocks: validation split and scoring, best-model tracking, overlays."""
