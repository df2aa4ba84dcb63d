"""Accuracy of a model on labelled data, and its agreement with a reference model."""
