"""Threshold rules, selection, and selection metrics against ground-truth flags."""
