"""Samples, schemas, loading and validation, prompt format, tokenisation, demo federations."""
