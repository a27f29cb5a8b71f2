"""Measuring samples: feature-space metrics (FD, IS, precision/recall) and the statistics behind the report's findings."""
