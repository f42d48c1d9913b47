"""The computation: TP layers, the Llama-family forward and generate through a provider, the tokenizer and chat
template, and initialisation."""
