"""Data stage: raw corpora -> cleaned, deduplicated, tokenized WebDataset shards (see DESIGN.md)."""
