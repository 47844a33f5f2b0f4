"""Exact COCO evaluation (equal to pycocotools), split over ranks, and the validation pass."""
