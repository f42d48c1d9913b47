"""llama.cpp GGUF files: the validated container, its tokenizer as HF's, and GGUF -> HF checkpoint."""
