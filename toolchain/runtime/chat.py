"""Talk to an artifact: the conversation through the artifact's own chat template (onnxruntime-genai's
Tokenizer.apply_chat_template on the messages as JSON), greedy decoding, the text streamed token by token through
the tokenizer's stream. `toolchain chat` and `toolchain generate` are this module. No torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from toolchain.runtime import genai, manifest, session
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.validate import pick_provider


@dataclass
class Answer:
    text: str
    tokens: list[int]  # the new tokens, without the end-of-sequence token
    prompt_tokens: int
    ttft_s: float
    decode_tok_s: Optional[float]  # None when fewer than two tokens were produced
    stopped: str  # "eos": the model ended its answer; "length": max_new_tokens (or the context) ran out

    def out(self) -> dict:
        """What `toolchain generate --json` prints."""
        return {"text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "new_tokens": len(self.tokens), "ttft_ms": round(1000 * self.ttft_s, 3),
                "decode_tok_s": self.decode_tok_s, "stopped": self.stopped}


def _context_length(folder: Path) -> int:
    try:
        return int(json.loads((folder / "genai_config.json").read_text())["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ToolchainError(f"{folder / 'genai_config.json'}: missing, or without model.context_length; pass an "
                             "artifact folder written by `toolchain edge` (an onnxruntime-genai folder)") from None


class Chat:
    """One conversation with an artifact. raw: the prompt goes to the model as it is, without the chat template
    (and without the conversation so far). adapter: on a multi-adapter artifact, the adapter to answer with (None:
    the base alone); every adapter is checked against the manifest and loaded once, and use() switches between
    requests."""

    def __init__(self, folder: Path, system: Optional[str] = None, threads: Optional[int] = None, raw: bool = False,
                 adapter: Optional[str] = None):
        self.folder = Path(folder)
        self.context = _context_length(self.folder)
        provider, options, man = "cpu", None, {}
        if (self.folder / manifest.MANIFEST).is_file():
            man = manifest.read(self.folder)
            if man.get("model_card", {}).get("kind") == "encoder":
                raise ToolchainError(f"{self.folder}: an encoder artifact (it labels text, it does not generate); "
                                     "chat and generate need a decoder artifact")
            provider, why = pick_provider(man["target"])
            if provider is None:
                raise ToolchainError(f"{self.folder}: {why}; run it on a host with that EP")
            options = man["target"].get("provider_options") if provider != "cpu" else None
        if raw and system:
            raise ToolchainError("--system goes into the chat template, which --raw skips: drop one of them")
        self.settings = session.resolve(self.folder, threads)
        self.model, self.tok = genai.load(self.folder, provider, options, self.settings)
        self.adapters = sorted((man.get("adapters") or {}))
        if adapter is not None and not self.adapters:
            raise ToolchainError(f"{self.folder}: --adapter {adapter}: this artifact has no adapters (its manifest "
                                 "lists none); build one with `toolchain edge --adapters RECIPE,RECIPE`")
        if self.adapters:
            from toolchain.runtime.adapters import checked_files, load_into

            self.model = load_into(self.model, checked_files(self.folder, man, self.adapters))[0].use(adapter)
        self.eos = genai.eos_ids(self.tok)
        self.system, self.raw = system, raw
        self.messages: list[dict] = []
        self.reset()

    @property
    def adapter(self) -> Optional[str]:
        return getattr(self.model, "name", None)

    def use(self, adapter: Optional[str]) -> None:
        """Answer with another adapter (None: the base alone) from the next request on; the conversation stays."""
        if not self.adapters:
            raise ToolchainError(f"{self.folder}: this artifact has no adapters")
        self.model = self.model.use(adapter)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, text: str) -> list[int]:
        if self.raw:
            return [int(i) for i in self.tok.encode(text)]
        messages = self.messages + [{"role": "user", "content": text}]
        try:
            prompt = self.tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except RuntimeError as e:  # e.g. "Empty chat template."
            raise ToolchainError(f"{self.folder}: the tokenizer has no usable chat template ({e}); pass --raw to send "
                                 "the prompt as it is") from None
        return [int(i) for i in self.tok.encode(prompt)]

    def ask(self, text: str, max_new_tokens: int = 256, on_text: Optional[Callable[[str], None]] = None,
            lookup: int = 0) -> Answer:
        """The answer to `text`, greedy, streamed to on_text piece by piece (with lookup > 0: prompt-lookup decoding,
        the whole answer at the end). The turn joins the conversation unless raw."""
        ids = self.prompt_ids(text)
        room = self.context - len(ids) - (1 if lookup else 0)  # lookup's generator holds one token more
        if room < 1:
            raise ToolchainError(f"the prompt{'' if self.raw else ' with the conversation so far'} is {len(ids)} "
                                 f"tokens, the model's context {self.context}: "
                                 + ("shorten it" if self.raw else "/reset, or a shorter prompt"))
        stream = self.tok.create_stream()

        def piece(t: int) -> None:
            if t not in self.eos:
                on_text(stream.decode(t))

        g = genai.generate(self.model, ids, min(max_new_tokens, room), lookup=lookup, eos=self.eos,
                           on_token=piece if on_text and not lookup else None)
        stopped = "eos" if g.tokens and g.tokens[-1] in self.eos else "length"
        new = g.tokens[:-1] if stopped == "eos" else g.tokens
        answer = genai.decode(self.tok, new)
        if on_text and lookup:
            on_text(answer)
        if not self.raw:
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        rate = g.decode_tok_s
        return Answer(answer, new, len(ids), g.ttft_s, None if math.isnan(rate) else rate, stopped)
