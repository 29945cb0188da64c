"""A character-level tokenizer for the text world, built locally with `tokenizers` and saved as an ordinary
`PreTrainedTokenizerFast` folder beside the model (`AutoTokenizer.from_pretrained` reads it back).

One token per character (letters, digits, space and a little punctuation), except the instruction words of the
tasks, which are one token each (short prompts: the base learns faster with 3 tokens of "reverse: " than 9);
`<pad>` = 0 (also the decoder
start token), `</s>` = 1 (appended to every encoded text), `<unk>` = 2. Decoding joins the characters
(`decoders.Fuse`), so `decode(encode(text)) == text` for every text in the alphabet.

References: huggingface/tokenizers (WordLevel model, Split pre-tokenizer); T5's special-token layout (pad 0, eos 1).
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


SPECIALS = ("<pad>", "</s>", "<unk>")
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " :+-=.,?"
# The instruction words that are one token each, in the shipped vocabulary's order (frozen, so a rebuild gives
# the shipped tokenizer): the task words of the world's first build. Tasks added later ("third", "penult",
# "inner", "lastcap") are spelled letter by letter, as any new instruction would be.
WORDS = ("reverse", "upper", "double", "repeat", "dash", "first", "second", "ends", "head", "tail", "drop", "chop",
         "swap", "mirror", "space", "initial", "copy", "lower", "title", "last", "rotate")


def build_tokenizer(folder: str | Path | None = None, words=WORDS) -> PreTrainedTokenizerFast:
    """The character tokenizer (+ one token per instruction word); written to `folder` when one is given."""
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *ALPHABET, *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # an instruction word is one token only where an instruction is: followed by ':' or ' ' (so a task's
    # input word that contains "sort" is still spelled letter by letter)
    pattern = f"(?:{'|'.join(sorted(words, key=len, reverse=True))})(?=[: ])|." if words else "."
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")   # a word or one character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False,
                                   model_max_length=64)
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast
