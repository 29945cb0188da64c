"""The Gradio UI of MoLE Studio: one module per tab and what they share (app.py wires them)."""
