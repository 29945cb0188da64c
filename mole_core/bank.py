"""The bank contract both wings keep: a folder of LoRAs, each described by a manifest.

The image bank (mole_core.image.bank.Bank) and the text bank (mole_core.text.bank.TextBank) differ in what they
read (diffusers / kohya files with example images; PEFT files or adapter folders with example input/output
pairs) but answer the same questions the same way, so the engines, the CLI, the UI and the studies treat them
alike:

    bank.folder        the folder it reads
    bank.entries       every entry in key order, a broken one (unreadable file, bad manifest, a LoRA that does
                       not fit) included with its `error` set; a property
    bank.keys()        every entry's key: `get` finds each of them
    bank.usable_keys() the keys of the entries without an error: the ones a Mix may name
    bank.get(key)      the entry, broken or not; UnknownLora (a KeyError) for a key the bank does not hold
    bank.load(key)     the entry's LoRA in canonical form, named by its key; ValueError with the entry's
                       error for a broken entry
    bank.rescan()      read the folder again

An entry has `key`, `name`, `trigger` (a list of words that ask for it), `description`, `default_weight`,
`examples` (pairs: gate-training data), `lora_path` and `error`.

References: peft `PeftModel.from_pretrained` / diffusers `load_lora_weights` (one name per adapter); the
kohya/Civitai practice of trigger words.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from mole_core.lora import Lora


@runtime_checkable
class BankEntryLike(Protocol):
    """The fields every bank entry has (image: BankEntry, text: TextEntry)."""
    key: str                                    # file stem; unique in the bank, used as the expert name
    name: str                                   # display name
    trigger: list[str]                          # the word(s) that ask for this LoRA ([] when none)
    description: str
    default_weight: float
    examples: list[tuple]                       # pairs: (image, caption) or (input, output)
    lora_path: Path | None
    error: str | None                           # why the entry cannot be used; None when fine


@runtime_checkable
class LoraBank(Protocol):
    """The contract of this module's docstring."""
    folder: Path

    @property
    def entries(self) -> list[BankEntryLike]: ...

    def keys(self) -> list[str]: ...

    def usable_keys(self) -> list[str]: ...

    def get(self, key: str) -> BankEntryLike: ...

    def load(self, key: str) -> Lora: ...

    def rescan(self) -> None: ...


class UnknownLora(KeyError):
    """A key the bank does not hold. A KeyError (a bank is looked up like a mapping) whose str is the sentence
    itself, without the quotes KeyError adds."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def find(entries: Sequence[BankEntryLike], key: str) -> BankEntryLike:
    """The entry of `entries` named `key`; UnknownLora naming the usable keys when there is none."""
    for entry in entries:
        if entry.key == key:
            return entry
    usable = sorted(e.key for e in entries if e.error is None)
    raise UnknownLora(f"Unknown LoRA {key!r}: the bank holds {', '.join(usable) or 'no LoRAs'}.")


def usable_entry(bank: LoraBank, key: str) -> BankEntryLike:
    """The entry `key` when a Mix may name it; ValueError (the engines' bad-input signal) with one sentence
    for an unknown key or a broken entry."""
    try:
        entry = bank.get(key)
    except UnknownLora as e:
        raise ValueError(str(e)) from None
    if entry.error:
        raise ValueError(f"The LoRA {key!r} of the bank cannot be used: {entry.error}")
    return entry


def as_trigger(value, where: str) -> list[str]:
    """A manifest's "trigger" as a list of words: a string is one trigger; ValueError naming `where`."""
    trigger = [value] if isinstance(value, str) else value
    if not isinstance(trigger, list) or not all(isinstance(t, str) for t in trigger):
        raise ValueError(f"{where}: 'trigger' must be a list of strings, found {value!r}.")
    return trigger
