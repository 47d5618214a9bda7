"""tuneforge: adapt pretrained language models with every fine-tuning method, in one hackable codebase."""

__version__ = "0.1.0"
