"""Prompt stages: templates (offline) or an LLM through transformers."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

from psr.core.components import HoldsModel
from psr.core.features import _first_line, _resolve_device, _torch_dtype
from psr.core.tiny import build_clip_tokenizer
from psr.errors import UserError

if TYPE_CHECKING:

    pass

from psr.synth.stages.common import _article, _join, derive_seed  # noqa: F401

# ---------------------------------------------------------------------------- tables
SCENES: dict[str, str] = {
    # background noun (edit instructions) → phrase the prompt ends with
    "a wooden table": "on a wooden table",
    "a sunny park": "in a sunny park",
    "a sandy beach": "on a sandy beach",
    "a cozy living room": "in a cozy living room",
    "a city street": "on a city street",
    "a snowy forest": "in a snowy forest",
    "a kitchen counter": "on a kitchen counter",
    "a flower garden": "in a flower garden",
    "a mountain trail": "on a mountain trail",
    "a library shelf": "on a library shelf",
}

RELATIONS: tuple[str, ...] = ("next to", "to the left of", "to the right of", "in front of", "behind", "near")

PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    # {0}, {1}: subject phrases ("a cat", "an owl wearing a red hat"); {all}: every subject
    # phrase joined ("a cat, a dog and an owl"); {relation}, {scene}: table entries.
    "one": ("a photo of {0} {scene}", "{0} {scene}, high quality photo"),
    "two": ("a photo of {0} and {1} {scene}", "a photo of {0} {relation} {1} {scene}",
            "{0} {relation} {1}, {scene}"),
    "many": ("a photo of {all} {scene}", "{all} together {scene}"),
}


LLM_INSTRUCTION = ("Write one short, vivid sentence describing a photo that shows {subjects} {scene}. "
                   "Mention every one of them by name.\nSentence:")


# ---------------------------------------------------------------------------- prompt
@dataclass
class PromptPlan:
    """What the target shows, in parts, so later stages can reuse and rewrite it."""

    categories: list[str]
    scene: str
    """A SCENES phrase ("on a wooden table")."""
    relation: str | None
    template: str
    """The PROMPT_TEMPLATES entry that renders the parts (edits re-render with it)."""
    details: list[str] = field(default_factory=list)
    """Per subject, a trailing phrase ("wearing a red hat") or ""."""
    text: str = ""
    """The instruction the target is generated from."""
    source: str = "template"
    """'template', 'llm', or 'llm-fallback' (the LLM's text was unusable)."""

    def subject_phrase(self, i: int) -> str:
        """'a cat' / 'an owl wearing a red hat'."""
        detail = self.details[i] if i < len(self.details) else ""
        category = self.categories[i]
        return f"{_article(category)} {category}" + (f" {detail}" if detail else "")

    def subject_name(self, i: int) -> str:
        """'the cat' / 'the owl wearing a red hat' (SynthSubject.name)."""
        return "the " + self.subject_phrase(i).split(" ", 1)[1]

    def render(self) -> str:
        phrases = [self.subject_phrase(i) for i in range(len(self.categories))]
        return self.template.format(*phrases, all=_join(phrases), relation=self.relation or "next to",
                                    scene=self.scene)


def template_plan(categories: Sequence[str], seed: int) -> PromptPlan:
    """Draw template, scene and relation from `random.Random(seed)` and render."""
    if not categories:
        raise UserError("prompt: need at least one category")
    rng = random.Random(seed)
    group = {1: "one", 2: "two"}.get(len(categories), "many")
    plan = PromptPlan(categories=list(categories), scene=SCENES[rng.choice(sorted(SCENES))],
                      relation=rng.choice(RELATIONS), template=rng.choice(PROMPT_TEMPLATES[group]),
                      details=[""] * len(categories))
    plan.text = plan.render()
    return plan


class TemplatePrompt:
    name = "template"

    def __call__(self, categories: Sequence[str], seed: int) -> PromptPlan:
        return template_plan(categories, seed)


def mentions(text: str, category: str) -> bool:
    """Whether `text` names `category` as whole words (case-insensitive; a plural 's'/'es' counts)."""
    words = r"\s+".join(re.escape(w) for w in category.lower().split())
    return re.search(rf"\b{words}(?:s|es)?\b", text.lower()) is not None


def sanitize_llm_text(raw: str, categories: Sequence[str], max_chars: int = 300) -> str | None:
    """The LLM's first non-empty line, unquoted, whitespace collapsed and cut at a word
    boundary to `max_chars`; None when it is empty or does not name every category."""
    line = next((ln for ln in raw.splitlines() if ln.strip()), "")
    text = " ".join(line.split()).strip(" \"'`")
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    if not text or not all(mentions(text, c) for c in categories):
        return None
    return text


class LlmPrompt(HoldsModel):
    """A causal LM writes the instruction; anything unusable falls back to the template.

    `calls` and `fallbacks` count what happened, so a run can report how often the LLM
    was ignored (an untrained or unsuitable model shows up as a fallback rate near 1).
    """

    name = "llm"

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 48, temperature: float = 0.8,
                 do_sample: bool = True, max_chars: int = 300):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.do_sample = do_sample
        self.max_chars = max_chars
        self.calls = 0
        self.fallbacks = 0

    def _encode(self, instruction: str):
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            enc = tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            return enc["input_ids"], enc["attention_mask"]
        ids = tok(instruction)["input_ids"]
        # Tokenizers that close every text with end-of-text (CLIP's does) would ask the
        # model to continue after the end.
        if len(ids) > 1 and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        ids = torch.tensor([ids])
        return ids, torch.ones_like(ids)

    def generate_text(self, instruction: str, seed: int) -> str:
        """The model's continuation of `instruction` (new tokens only), sampled under `seed`."""
        import torch

        input_ids, attention = self._encode(instruction)
        devices = [self.device] if self.device.type == "cuda" else []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                temperature=self.temperature if self.do_sample else None, top_p=None, top_k=None,
                pad_token_id=pad)
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    def __call__(self, categories: Sequence[str], seed: int) -> PromptPlan:
        plan = template_plan(categories, seed)
        subjects = _join([plan.subject_phrase(i) for i in range(len(categories))])
        raw = self.generate_text(LLM_INSTRUCTION.format(subjects=subjects, scene=plan.scene), seed)
        self.calls += 1
        text = sanitize_llm_text(raw, categories, self.max_chars)
        if text is None:
            self.fallbacks += 1
            return replace(plan, source="llm-fallback")
        return replace(plan, text=text, source="llm")


def _template_prompt(device="cpu") -> TemplatePrompt:
    return TemplatePrompt()


def _llm_prompt(device="cpu", *, path: str | None = None, tiny: bool = False, seed: int = 0,
                dtype: str = "float32", max_new_tokens: int = 48, temperature: float = 0.8,
                do_sample: bool = True, max_chars: int = 300) -> LlmPrompt:
    """`path`: hub id or folder of a causal LM with its tokenizer. `tiny`: a random-init
    2-layer GPT-2 over the CLIP BPE vocabulary (built offline), for tests."""
    dt = _torch_dtype(dtype)
    if path is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
        except (OSError, ValueError) as err:
            raise UserError(f"prompt.path {path}: cannot load a causal LM ({_first_line(err)})") from None
    elif tiny:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = build_clip_tokenizer(77)
        cpu_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = GPT2LMHeadModel(GPT2Config(
                vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        finally:
            torch.random.set_rng_state(cpu_state)
        model.to(dt)
    else:
        raise UserError("prompt 'llm': give path (a causal LM hub id or folder) or tiny=true")
    model.to(_resolve_device(device))
    return LlmPrompt(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                     do_sample=do_sample, max_chars=max_chars)
