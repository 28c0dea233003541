"""`pagewire chat`: an interactive terminal chat; the server renders the history with the chat template."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from pagewire.generate_client import ClientConfig, ClientError, GenerationClient, sampling_from, stream_text
from shared.pb.pagewire.v1 import generate_pb2 as pb

EXIT_COMMANDS = ("/exit", "/quit")
PROMPT = ">>> "


def chat(
    config: ClientConfig,
    system: str | None,
    stop: Sequence[str],
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
) -> int:
    """Reads one user message per line, streams each answer, keeps the conversation; `/exit` or EOF ends.

    Every request carries the whole history (system message first, when given), so the model sees the
    conversation; an answer that fails is dropped from it and the user can type again.
    """
    history: list[pb.ChatMessage] = [pb.ChatMessage(role="system", content=system)] if system else []
    sampling = sampling_from(config, stop)
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {config.address}; /exit or Ctrl-D ends", file=stderr)
    with GenerationClient(config) as client:
        while True:
            if interactive:
                stdout.write(PROMPT)
                stdout.flush()
            line = stdin.readline()
            if not line:
                if interactive:
                    stdout.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in EXIT_COMMANDS:
                return 0
            user = pb.ChatMessage(role="user", content=text)
            request = pb.GenerateRequest(messages=pb.ChatMessages(messages=[*history, user]),
                sampling=sampling, adapter=config.adapter)
            try:
                answer = stream_text(client, request, stdout, stderr)
            except ClientError as error:
                print(f"\npagewire chat: {error}", file=stderr)
                if not interactive:
                    return 1
                continue
            stdout.write("\n")
            stdout.flush()
            history += [user, pb.ChatMessage(role="assistant", content=answer)]

