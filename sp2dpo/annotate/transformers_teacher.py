"""The transformers teacher engine: local `generate()`, greedy, batched with left padding."""

from __future__ import annotations

import threading

from sp2dpo.annotate.config import AnnotateConfig
from sp2dpo.annotate.engines import Generation


class TransformersTeacherEngine:
    """Local `generate()`: greedy, batched with left padding."""

    def __init__(self, config: AnnotateConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sp2dpo.models import resolve_model

        opts = config.transformers
        device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[opts.dtype]
        path = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = device
        self.generation = config.generation
        self.lock = threading.Lock()  # one padded batch at a time: generate() cannot merge batches

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        with self.lock:
            return self._generate(conversations)

    def _generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        import torch

        template = self.tokenizer.apply_chat_template
        texts = [template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        gen = self.generation
        sample = gen.temperature > 0
        if sample:
            torch.manual_seed(gen.seed)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=gen.max_tokens, do_sample=sample,
                                      temperature=gen.temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        result = []
        for i in range(len(conversations)):
            ids = new[i]
            stop = (ids == self.tokenizer.eos_token_id) | (ids == self.tokenizer.pad_token_id)
            n_new = int(stop.nonzero()[0, 0]) if bool(stop.any()) else len(ids)
            result.append(Generation(self.tokenizer.decode(ids[:n_new], skip_special_tokens=True),
                                     int(enc["attention_mask"][i].sum()), n_new,
                                     finish_reason="stop" if n_new < len(ids) else "length"))
        return result

    def close(self) -> None:
        del self.model
