"""Text priors: the prompt file, its encoding by a frozen text tower, and the name-keyed bank.

``prompts.encode`` (the command) runs an open_clip text tower (BiomedCLIP by default) or a
sentence-embedding model and writes a bank; training reads only the bank, with torch alone.
"""

from __future__ import annotations

from prompts.bank import (
    PriorBank,
    bank_from_released_tensors,
    load_prior_bank,
    load_released_priors,
    save_prior_bank,
)
from prompts.texts import (
    DEFAULT_PROMPTS_PATH,
    PromptSet,
    class_key,
    load_prompts,
    modality_key,
    parse_prompts,
    text_hash,
)

__all__ = [
    "DEFAULT_PROMPTS_PATH",
    "PriorBank",
    "PromptSet",
    "bank_from_released_tensors",
    "class_key",
    "load_prior_bank",
    "load_prompts",
    "load_released_priors",
    "modality_key",
    "parse_prompts",
    "save_prior_bank",
    "text_hash",
]
