"""Evaluation: the metrics (CLIP-T, CLIP-I, FID, scene-graph geometry) and the ``evaluate shapes`` and
``evaluate coco`` protocols."""
