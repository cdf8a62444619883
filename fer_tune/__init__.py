"""fer-tune: hyperparameter search for facial expression recognition."""

__version__ = "0.1.0"
