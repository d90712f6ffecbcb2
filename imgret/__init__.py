"""imgret: an experiment-tracked research harness for image retrieval."""
__version__ = "0.1.0"
