"""Speculative-decoding workloads: chat prompts whose answer copies a passage given in the prompt, and
plain short chat questions, rendered with the model's chat template into token ids."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from benchmarks.workloads import BenchRequest
from scheduler_service.chat_template import ChatTemplate, ChatTurn
from scheduler_service.tokenizer import Tokenizer

COPY = "copy"
CHAT = "chat"
WORKLOADS = (COPY, CHAT)

# Coherent paragraphs (about 150 tokens each) that the copy workload quotes; a request's passage is one
# of them, led by its own document number so that requests share no prefix-cache blocks past it.
_PARAGRAPHS = (
    "The old lighthouse stood at the edge of the cliff for nearly two hundred years. Every evening the "
    "keeper climbed the narrow stairs to light the lamp before sunset, and ships passing through the "
    "strait relied on its beam to avoid the rocks below. In the winter of 1887 a storm destroyed the "
    "lower windows and flooded the storeroom, so the village council voted to repair the tower with "
    "stone from the nearby quarry. Engineers later replaced the oil lamp with an electric light that "
    "could be seen for thirty miles. Today the building is a small museum that welcomes visitors from "
    "April to October, and the keeper's cottage has become a cafe that serves fresh fish and bread.",
    "The river begins as a spring high in the mountains and flows east for three hundred kilometres "
    "before it reaches the sea. Farmers along its banks grow wheat, barley and grapes in the fertile "
    "valley soil. A railway bridge built in 1902 crosses the river at its widest point near the town, "
    "and during the spring floods the water can rise more than four metres in a single week. "
    "Scientists at the university measure the temperature of the water every morning, and their "
    "records show that the river has warmed by almost two degrees since 1950. Fewer salmon now swim "
    "upstream each autumn, and the town has started a project to plant trees along the banks.",
    "The city library opens at nine o'clock and closes at six, except on public holidays. Members may "
    "borrow up to ten books at a time for a period of three weeks, and they can renew them twice "
    "online. A reading room on the second floor holds newspapers from more than forty countries, and "
    "a quiet study hall on the third floor can be booked by students during the exam season. Children "
    "can join the story hour every Saturday morning in the garden pavilion. The annual book sale, held "
    "in the first week of May, raises money for new computers and a mobile library van that visits "
    "the villages in the hills.",
    "To bake a simple loaf of bread, mix five hundred grams of flour with a teaspoon of salt, a packet "
    "of dry yeast and three hundred millilitres of warm water. Knead the dough on a floured table for "
    "ten minutes, until it is smooth and elastic. Leave it to rise in a warm place for about two "
    "hours, until it has doubled in size. Then press out the air, shape it into a round loaf and let "
    "it rise again for half an hour. Bake it in a hot oven for forty minutes. The crust should be "
    "golden brown, and the loaf should sound hollow when you tap it underneath. Let it cool before "
    "you cut it.",
)

_QUESTIONS = (
    "What is the capital of France?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Give me three tips for better sleep.",
    "What is a prime number?",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hiking trip?",
    "Explain photosynthesis in simple words.",
    "What are the planets of the solar system?",
    "How can I learn to play the guitar?",
    "What is the difference between weather and climate?",
    "Suggest a name for a small coffee shop.",
    "How many legs does a spider have?",
    "What is the best way to learn a new language?",
    "Write a short poem about the sea.",
    "What causes rain?",
)


def passages(num_passages: int, seed: int) -> list[str]:
    """`num_passages` passages, the paragraphs in turn from a seeded start."""
    offset = random.Random(seed).randrange(len(_PARAGRAPHS))
    return [_PARAGRAPHS[(offset + i) % len(_PARAGRAPHS)] for i in range(num_passages)]


def copy_conversation(document_number: int, passage: str) -> list[ChatTurn]:
    return [ChatTurn("user", f"Document {document_number}:\n{passage}\n\nRepeat document "
                             f"{document_number} exactly, word for word.")]


def chat_conversation(index: int) -> list[ChatTurn]:
    return [ChatTurn("user", _QUESTIONS[index % len(_QUESTIONS)])]


def conversations(workload: str, num_requests: int, seed: int) -> list[list[ChatTurn]]:
    """The conversations of one workload; the same seed gives the same list."""
    if workload == COPY:
        return [copy_conversation(i + 1, p) for i, p in enumerate(passages(num_requests, seed))]
    if workload == CHAT:
        offset = random.Random(seed).randrange(len(_QUESTIONS))
        return [chat_conversation(offset + i) for i in range(num_requests)]
    raise ValueError(f"unknown workload {workload!r}; use one of {', '.join(WORKLOADS)}")


class ChatPrompts:
    """Renders conversations as the server does for `messages` (chat template, add_generation_prompt,
    no special tokens added), so requests go out as token ids and their prompt lengths are known."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.template = ChatTemplate.from_tokenizer(tokenizer)

    @classmethod
    def for_model(cls, model_path: str | Path) -> ChatPrompts:
        return cls(Tokenizer.from_model_path(model_path))

    def token_ids(self, conversation: Sequence[ChatTurn]) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode_without_special_tokens(self.template.render(conversation)))

    def requests(self, conversations: Sequence[Sequence[ChatTurn]], max_tokens: int) -> list[BenchRequest]:
        return [
            BenchRequest(max_tokens=max_tokens, prompt_token_ids=self.token_ids(turns)) for turns in conversations
        ]
