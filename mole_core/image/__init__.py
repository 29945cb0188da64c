"""The image wing: diffusers pipelines and families, the image engine, bank, peers."""
