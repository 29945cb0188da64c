"""The evaluation harnesses (image and text) and their reports."""
