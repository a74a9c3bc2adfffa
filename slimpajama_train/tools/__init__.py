"""Offline tools around a run: evaluation (perplexity, lm-eval), HF export, tokenizer conversion,
text generation, plots, mixture studies, the demo, and loading a checkpoint as one model.

Nothing in the training core (``slimpajama_train`` outside this package) imports from here.
"""
