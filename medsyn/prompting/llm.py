"""The `llm` backend: ask any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, Ollama, OpenAI)
to write the Findings, with the instruction of the paper (section 2.1), adapted to chest CT.

Transport problems are retried (timeouts, 408/429/5xx answers, answers that are not a chat completion)
and become one-line `DataError`s when retries run out; a refused connection or another HTTP error
fails at once. The API key is sent as a Bearer header and written nowhere else.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from medsyn.errors import DataError

CHAT_PATH = "/chat/completions"
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FINDINGS = re.compile(r"findings\s*:", re.IGNORECASE)


def instruction(anatomy: list[str], pathology: list[str]) -> str:
    """The paper's prompt for given terms: use exactly these words, no negative sentences, ~50 words."""
    return (
        f"anatomy_list = {list(anatomy)!r}\n"
        f"pathology_list = {list(pathology)!r}\n"
        "Here are two lists of anatomy and pathology for chest CT. Please write some findings that "
        f"include exactly these {len(anatomy)} words from the anatomy list and {len(pathology)} from the "
        "pathology list, and do not write any negative sentences in the findings. Please ensure the "
        "findings are reasonable for a chest CT in real medical scenarios. The output should be in about "
        "50 words. Here is an example:\n"
        "anatomy_list = ['heart', 'diaphragm']\n"
        "pathology_list = ['effusion', 'opacity']\n"
        "Findings: Presence of opacity observed near the heart and diaphragm regions suggestive of "
        "effusion.\n"
        "Please generate the output in the following format:\n"
        f"anatomy_list = {list(anatomy)!r}\n"
        f"pathology_list = {list(pathology)!r}\n"
        "Findings:"
    )


def chat_url(url: str) -> str:
    """`url` as a chat-completions endpoint: kept if it ends with the path, else `/v1/chat/completions`
    (or `/chat/completions` after a URL ending in `/v1`) is appended."""
    url = url.rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise DataError(f"--url {url!r}: expected an http:// or https:// URL of an OpenAI-compatible server")
    if url.endswith(CHAT_PATH):
        return url
    return url + (CHAT_PATH if url.endswith("/v1") else "/v1" + CHAT_PATH)


def findings_text(content: str) -> str:
    """The Findings of an answer: reasoning blocks removed, the text after the last "Findings:" (the
    whole answer without one), on one line."""
    content = _THINK.sub(" ", content)
    parts = _FINDINGS.split(content)
    text = parts[-1] if len(parts) > 1 else content
    return " ".join(text.split())


class RetryableError(Exception):
    """A failed request worth trying again (timeout, overload, malformed answer)."""


@dataclass
class ChatClient:
    """A minimal OpenAI-compatible chat client (urllib, no dependencies)."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 256

    def __post_init__(self) -> None:
        self.endpoint = chat_url(self.url)

    def complete(self, prompt: str, seed: int | None = None) -> str:
        """The assistant's message content for one user message; RetryableError or DataError otherwise."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if seed is not None:
            body["seed"] = seed
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers, method="POST")
        where = f"--url {self.endpoint}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = _snippet(err.read() if err.fp is not None else b"")
            message = f"{where}: HTTP {err.code} {err.reason}" + (f" ({detail})" if detail else "")
            if err.code in _RETRY_STATUS:
                raise RetryableError(message) from None
            hint = "; check --api-key-env" if err.code in (401, 403) else "; check --url and --model"
            raise DataError(message + hint) from None
        except TimeoutError as err:
            raise RetryableError(f"{where}: no answer within --timeout {self.timeout:g} s") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise RetryableError(f"{where}: no answer within --timeout {self.timeout:g} s") from None
            raise DataError(
                f"{where}: cannot connect ({_reason(err.reason)}); is the server running?"
            ) from None
        except (ConnectionError, OSError) as err:  # reset or closed mid-answer
            raise RetryableError(f"{where}: connection failed ({_reason(err)})") from None
        return _content(raw, where)


def _reason(reason) -> str:
    text = getattr(reason, "strerror", None) or str(reason)
    return " ".join(str(text).split())


def _snippet(raw: bytes, limit: int = 160) -> str:
    text = " ".join(raw.decode("utf-8", "replace").split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _content(raw: bytes, where: str) -> str:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RetryableError(f"{where}: the answer is not JSON ({_snippet(raw, 80)!r})") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RetryableError(f"{where}: the answer has no choices[0].message.content "
                             f"({_snippet(raw, 80)!r})") from None  # fmt: skip
    if not isinstance(content, str) or not content.strip():
        raise RetryableError(f"{where}: the answer's message content is empty")
    return content


def ask(client: ChatClient, prompt: str, seed: int | None, retries: int, backoff_s: float = 0.5) -> str:
    """`client.complete` with up to `retries` more tries after a retryable failure; DataError after."""
    for attempt in range(retries + 1):
        try:
            return client.complete(prompt, seed)
        except RetryableError as err:
            if attempt == retries:
                raise DataError(f"{err} (after {retries + 1} attempts)") from None
            time.sleep(backoff_s * (attempt + 1))
    raise AssertionError("unreachable")
