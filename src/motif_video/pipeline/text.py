"""Prompt encoding: tokenizer + text encoder -> per-token states (the model reads `last_hidden_state`)."""

from __future__ import annotations

import torch

from ..errors import MotifVideoError, warn


class PromptEncoder:
    """Encodes prompts to (states (B, L, D), keep-mask (B, L) or None).

    The release pads every prompt to 512 tokens and passes a mask, which rules out fused attention kernels. Padding
    never influences the video tokens (padded keys are masked everywhere), so we trim it: to the prompt's own length
    for batch 1 (no mask at all) and to the longest prompt of a batch otherwise.
    """

    def __init__(self, tokenizer, text_encoder, max_length: int = 512):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str], trim_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
        if bool(mask[:, -1].any()):  # a prompt filled every position: it may have been cut
            self._warn_if_cut(prompts)
        # A prompt that tokenises to nothing (an empty negative prompt with a tokenizer that adds no special token)
        # keeps one pad token, so attention never sees an all-masked row.
        mask[:, 0] |= ~mask.any(dim=1)
        if trim_padding:
            length = int(mask.sum(dim=1).max())
            ids, mask = ids[:, :length], mask[:, :length]
        states = self.text_encoder(input_ids=ids.to(self.device), attention_mask=mask.long().to(self.device))
        states = states.last_hidden_state
        if trim_padding and bool(mask.all()):
            return states, None
        return states, mask.to(states.device)

    def _warn_if_cut(self, prompts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True, truncation=False,
                                                      verbose=False)["input_ids"]]
        longest = max(lengths)
        if longest > self.max_length:
            warn(f"a prompt of {longest} tokens is cut to the text encoder's {self.max_length}; the words after "
                 f"that are ignored")


def text_length(keep: torch.Tensor) -> int:
    """Tokens of a right-padded prompt (L,) up to its last kept one; all of them when none is kept."""
    return int(keep.nonzero().max()) + 1 if keep.any() else keep.shape[0]


def pad_text(texts: list[torch.Tensor], masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L_i, D) states to (B, L_max, D) with zeros, and their (L_i,) keep-masks (None: all kept) to a
    (B, L_max) keep-mask that is False on the padding."""
    length = max(t.shape[0] for t in texts)
    out = texts[0].new_zeros(len(texts), length, texts[0].shape[1])
    keep = torch.zeros(len(texts), length, dtype=torch.bool, device=texts[0].device)
    for i, (t, m) in enumerate(zip(texts, masks)):
        out[i, : t.shape[0]] = t
        keep[i, : t.shape[0]] = True if m is None else m
    return out, keep


def pad_and_stack(encoded: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch several (states (B_i, L_i, D), mask or None) of different lengths into one; mask None if none pads."""
    rows = [(s[i], None if m is None else m[i]) for s, m in encoded for i in range(s.shape[0])]
    states, keep = pad_text([s for s, _ in rows], [m for _, m in rows])
    return states, None if bool(keep.all()) else keep


def check_prompt(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise MotifVideoError("the prompt is empty: describe the video to generate")
    return prompts
