"""Export: tuneforge models and adapters in the formats other runtimes load.

``gguf``: llama.cpp's single-file format (and so Ollama, LM Studio, ...): a merged model as one ``.gguf`` file
(``write_model_gguf``), or a LoRA adapter as a GGUF LoRA that llama.cpp applies on top of a base GGUF at load time
(``write_lora_gguf``).
"""

from tuneforge.export.gguf import GgufExportError, write_lora_gguf, write_model_gguf

__all__ = ["GgufExportError", "write_lora_gguf", "write_model_gguf"]
