"""Anatomy-pathology prompting (second seed paper, section 2.1): vocabularies from reports, and new
descriptive Findings written from drawn anatomy and pathology terms (templates or an LLM endpoint)."""

from medsyn.prompting.corpus import read_corpus
from medsyn.prompting.draw import Draw, draw_terms
from medsyn.prompting.generate import PromptSet, generate_prompts, write_prompts
from medsyn.prompting.llm import ChatClient, instruction
from medsyn.prompting.negation import affirmed
from medsyn.prompting.vocab import (
    PromptVocabulary,
    Term,
    Vocabulary,
    build_vocabulary,
    read_review,
    read_vocab,
    write_vocabulary,
)

__all__ = [
    "ChatClient",
    "Draw",
    "PromptSet",
    "PromptVocabulary",
    "Term",
    "Vocabulary",
    "affirmed",
    "build_vocabulary",
    "draw_terms",
    "generate_prompts",
    "instruction",
    "read_corpus",
    "read_review",
    "read_vocab",
    "write_prompts",
    "write_vocabulary",
]
