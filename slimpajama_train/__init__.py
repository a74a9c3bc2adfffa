"""Training stage: decoder-only LM pretraining on WebDataset shards with FSDP2 (and DeepSpeed ZeRO)."""

__version__ = "0.1.0"
