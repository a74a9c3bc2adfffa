"""Observers of a training run: console progress, a metrics JSONL file, Weights & Biases, a speed
monitor (tokens/s, MFU). Each callback only observes; checkpointing is the checkpointer's job.

Import what you need from the submodules (``callbacks.config`` holds the config dataclasses and
imports no callback, so the root config can compose it without pulling them in).
"""
