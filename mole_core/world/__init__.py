"""The pixel world: the embedded default model's scenes, captions, and the oracle that scores images.

    from mole_core.world import sample_scene, render_pil, caption, parse_caption, Oracle
    oracle = Oracle.load("assets/pixel-world/oracle")
    readings = oracle.read(images)
    caption_fidelity(readings, captions); subject_fidelity(readings, captions, "zwx")

(`render`, the array renderer, stays reachable as `mole_core.world.render.render`: the name
`render` on this package is its submodule.)

Rebuild everything: `python -m mole_core.world build [--out DIR] [--seed S] [--quick]`.
"""
from mole_core.world.oracle import Oracle, Reading, caption_fidelity, items_satisfied, subject_fidelity
from mole_core.world.render import (POSITIONS, SHAPES, STYLES, SUBJECTS, Scene, WorldObject, caption,
                                    caption_style, parse_caption, render_pil, sample_scene,
                                    scene_from_caption)

__all__ = ["Oracle", "Reading", "caption_fidelity", "items_satisfied", "subject_fidelity", "POSITIONS",
           "SHAPES", "STYLES", "SUBJECTS", "Scene", "WorldObject", "caption", "caption_style", "parse_caption",
           "render_pil", "sample_scene", "scene_from_caption"]
