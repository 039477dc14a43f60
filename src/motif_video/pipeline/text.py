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


def pad_and_stack(encoded: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch several (states, mask) pairs of different lengths: right-pad with zeros and a False mask."""
    length = max(s.shape[1] for s, _ in encoded)
    states, masks = [], []
    for s, m in encoded:
        if m is None:
            m = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
        pad = length - s.shape[1]
        states.append(torch.nn.functional.pad(s, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(m, (0, pad), value=False))
    mask = torch.cat(masks)
    return torch.cat(states), None if bool(mask.all()) else mask


def check_prompt(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise MotifVideoError("the prompt is empty: describe the video to generate")
    return prompts
