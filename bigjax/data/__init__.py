"""Input pipeline: sources -> tokenization -> examples -> per-process grain loader -> global arrays."""
