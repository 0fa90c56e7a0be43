"""The tokenizer of a HF-layout checkpoint: tokenizer.json plus the checkpoint's BOS rule.

Text is always plain text here: a string such as "<|im_end|>" inside it (a title in the data,
say) is encoded as its characters, never as the control token; callers add control tokens by id
(Tokenizer.token_id). ChatML renders chat turns the way the ChatML chat templates of
tokenizer_config.json do (SmolLM2's, Qwen's), control tokens by id. This file imports nothing
from the project.
"""
import json
import os
import re


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the BOS rule of the checkpoint: special tokens are never
    added by the backend; BOS is prepended once iff tokenizer_config.json says add_bos_token."""

    def __init__(self, path: str, bos_id: int | None, add_bos: bool, eos_ids: list[int]):
        from tokenizers import Tokenizer as HFTokenizer
        self.tk = HFTokenizer.from_file(path)
        self.tk.encode_special_tokens = True
        self.bos_id, self.add_bos, self.eos_ids = bos_id, add_bos, eos_ids

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        """The id of a control token such as "<|im_start|>" (an error if the vocabulary lacks it)."""
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no token {token!r}")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()


class ChatML:
    """Chat turns as ChatML: <|im_start|>ROLE\nCONTENT<|im_end|>\n per message, then
    <|im_start|>assistant\n to open the answer. default_system: the system turn the template adds
    when the messages start without one (SmolLM2's "You are a helpful AI assistant named
    SmolLM..."), or None. Content is plain text; the two control tokens go by id."""

    def __init__(self, tok: Tokenizer, default_system: str | None):
        self.tok, self.default_system = tok, default_system
        self.start, self.end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")

    def turn(self, role: str, content: str) -> list[int]:
        return [self.start] + self.tok.encode(f"{role}\n{content}", bos=False) + [self.end] + self.tok.encode("\n", bos=False)

    def ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """messages: [{"role": ..., "content": ...}]; the ids the template renders for them."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        ids = [t for m in messages for t in self.turn(m["role"], m["content"])]
        return ids + (self.answer_prefix() if add_generation_prompt else [])

    def answer_prefix(self) -> list[int]:
        return [self.start] + self.tok.encode("assistant\n", bos=False)

    def wrap(self, system: str, text: str) -> list[int]:
        """A prompt `text` that opens with the line `system`: that line as the system turn, the
        rest as the user turn, then the assistant's turn opened (its first token answers)."""
        return self.ids([{"role": "system", "content": system.strip()}, {"role": "user", "content": text[len(system):]}])

    def wrap_split(self, system: str, head: str) -> list[int]:
        """wrap(system, system + head + tail) cut inside the user turn, after head: the shared part
        of many prompts that differ in their tail (cut at a pre-tokenizer boundary);
        wrap_split(system, head) + wrap_tail(tail) == wrap(system, system + head + tail)."""
        return self.turn("system", system.strip()) + [self.start] + self.tok.encode("user\n" + head, bos=False)

    def wrap_tail(self, tail: str) -> list[int]:
        return self.tok.encode(tail, bos=False) + [self.end] + self.tok.encode("\n", bos=False) + self.answer_prefix()


def chat_format(model_dir: str, tok: Tokenizer) -> ChatML | None:
    """The chat layout of model_dir's tokenizer_config.json chat_template when iclrec can render
    it (ChatML: the template writes <|im_start|> and <|im_end|> turns), else None. A default
    system turn written literally in the template is kept."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    template = None
    if os.path.exists(path):
        with open(path) as f:
            try:
                template = json.load(f).get("chat_template")
            except (ValueError, AttributeError):
                template = None
    if not isinstance(template, str) or "<|im_start|>" not in template or "<|im_end|>" not in template:
        return None
    default = re.search(r"<\|im_start\|>system\n([^'\"{}]*?)<\|im_end\|>", template)
    return ChatML(tok, default.group(1) if default else None)


def load_tokenizer(model_dir: str, args) -> Tokenizer:
    """The tokenizer of model_dir; args: the model's ModelArgs (bos_id, eos_ids, vocab_size)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json")
    tc_path, add_bos = os.path.join(model_dir, "tokenizer_config.json"), False
    if os.path.exists(tc_path):
        with open(tc_path) as f:
            try:
                tc = json.load(f)
            except ValueError as e:
                raise ValueError(f"{tc_path}: not valid JSON ({e})") from None
        add_bos = bool(tc.get("add_bos_token", False)) if isinstance(tc, dict) else False
    try:
        tok = Tokenizer(path, args.bos_id, add_bos, args.eos_ids)
    except Exception as e:                      # the tokenizers library raises its own Exception type
        raise ValueError(f"{path}: not a readable tokenizer ({e})") from None
    if tok.vocab_size > args.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                         f"{args.vocab_size}: ids past it would index outside the embeddings")
    return tok
