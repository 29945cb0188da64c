"""The pixel world: the embedded default model's scenes, captions, and the oracle that scores images.

    from mole_core.world.pixel import sample_scene, render_pil, caption, parse_caption, Oracle
    oracle = Oracle.load("assets/pixel-world/oracle")
    readings = oracle.read(images)
    caption_fidelity(readings, captions); subject_fidelity(readings, captions, "zwx")

(`render`, the array renderer, stays reachable as `mole_core.world.pixel.render.render`: the name
`render` on this package is its submodule.)

Modules: `render` (scenes, captions, the caption parser), `oracle` (the CNN that reads images and the
fidelity functions), `tokenizer`, `config` (the build's settings and the bank's LoRA specs), `build` (the
training stages), `quality` (the quality bars, the build's last stage), `scoring` (the world as an
evaluation suite: captions that ask for the LoRAs and the oracle as a scorer, used by mole_core.studies.evaluate).

Rebuild everything: `python -m mole_core.world build [--out DIR] [--seed S] [--quick]`.
"""
from mole_core.world.pixel.oracle import Oracle, Reading, caption_fidelity, items_satisfied, subject_fidelity
from mole_core.world.pixel.render import (POSITIONS, SHAPES, STYLES, SUBJECTS, Scene, WorldObject, caption,
                                    caption_style, parse_caption, render_pil, sample_scene,
                                    scene_from_caption)

__all__ = ["Oracle", "Reading", "caption_fidelity", "items_satisfied", "subject_fidelity", "POSITIONS",
           "SHAPES", "STYLES", "SUBJECTS", "Scene", "WorldObject", "caption", "caption_style", "parse_caption",
           "render_pil", "sample_scene", "scene_from_caption"]
