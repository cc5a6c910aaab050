"""Data: toy targets with exact flow maps, and dataset pipelines."""
