"""The text world: the embedded TEXT default, the image world's twin (MoLE's NLP half).

    from mole_core.world.text import LORA_TASKS, composed, load_model, load_text_lora, greedy
    model, tokenizer = load_model("assets/text-world")           # a tiny BartForConditionalGeneration
    greedy(model, tokenizer, ["reverse: abc"])                   # the base alone: it never learned reverse

Modules: `tasks` (the task families, composed tasks, held-out words), `tokenizer` (the character tokenizer),
`config` (the build's settings, loading), `decode` (batched greedy decoding), `lora_io` (text LoRA files in
mole_core.lora's canonical form), `build` (the stages), `quality` (the bars, the build's last stage).

Rebuild everything: `python -m mole_core.world.text build [--out DIR] [--seed S] [--quick]`.
"""
from mole_core.text.models import load_model
from mole_core.world.text.config import TextBuildConfig
from mole_core.text.decode import greedy
from mole_core.text.lora_io import load_text_lora, save_text_lora
from mole_core.world.text.tasks import (BANK_TASKS, BASE_TASKS, COMPOSED_PAIRS, DISTRACTOR_TASKS, LORA_TASKS, TASKS,
                                      TextTask, composed)

__all__ = ["TextBuildConfig", "load_model", "greedy", "load_text_lora", "save_text_lora", "BANK_TASKS", "BASE_TASKS",
           "COMPOSED_PAIRS", "DISTRACTOR_TASKS", "LORA_TASKS", "TASKS", "TextTask", "composed"]
