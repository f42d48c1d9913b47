"""Files and a rank's weights: safetensors read and written, loading, the sharded format, HF export, the
checked write that every rank agrees on, and GGUF import."""
