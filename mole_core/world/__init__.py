"""The embedded worlds, side by side: `pixel` (the default image model, its LoRA bank and the oracle that
scores images) and `text` (the default text model, its task LoRAs and their checks).

Rebuild either: `python -m mole_core.world build [--text] [--out DIR] [--seed S] [--quick]`.
"""
