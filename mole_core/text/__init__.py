"""The text wing: seq2seq / causal LMs, the text engine, PEFT file IO, decoding."""
