"""Labelled datasets for evaluation (npz, TFRecord, class folders, IDX) and their input pipeline."""
