"""Form fields the tabs share."""
from __future__ import annotations

import math

import gradio as gr


class FieldNumber(gr.Number):
    """A gr.Number that refuses, by its label, a value that is not a finite number.

    The browser sends numbers, but raw HTTP can send NaN, Infinity or text; Gradio's own preprocess then
    fails inside `int(round(nan))` or a comparison and the visitor gets `{"error": null}`. The frontend is
    gr.Number's own (`get_block_name`). Every number field of the app is one."""

    def get_block_name(self) -> str:
        return "number"

    def preprocess(self, payload):
        if payload is not None and (isinstance(payload, bool) or not isinstance(payload, (int, float))
                                    or not math.isfinite(payload)):
            raise gr.Error(f"{self.label} must be a finite number; got {str(payload)[:40]!r}.")
        return super().preprocess(payload)
