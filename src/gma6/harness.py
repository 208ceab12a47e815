"""lm-evaluation-harness model class: any harness task, long documents read segment by segment.

    import lm_eval, gma6
    from gma6.harness import GMA6LM

    base, tok = gma6.load_base()
    lm = GMA6LM(gma6.load_adapter(base, gma6.base.default_adapter()), tok, segment_length=512)
    lm_eval.simple_evaluate(model=lm, tasks=["wikitext"])

or by name, once this module is imported: ``simple_evaluate(model="gma6", model_args="adapter=DIR,
segment_length=512")``. Needs ``pip install 'gma6[lmeval]'``.

How a text longer than a segment is scored: it is cut into windows of ``segment_length - 1``
tokens counted back from its end (so the last window, where the continuation is, is full), each
window is read behind a BOS with the memory carried from the windows before it, and every scored
token is predicted exactly once, from its own window and the memory. ``use_memory=False`` runs the
bare base on the same windows (the comparison a memory must win).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("gma6.harness needs lm-evaluation-harness: pip install 'gma6[lmeval]'") from e


def windows_from_end(n: int, width: int) -> list[tuple[int, int]]:
    """``[start, end)`` windows of at most ``width`` tokens covering ``range(n)``, the last one full."""
    if width <= 0:
        raise ValueError(f"width={width}: expected a positive int")
    bounds, end = [], n
    while end > 0:
        bounds.append((max(0, end - width), end))
        end -= width
    return bounds[::-1]


@register_model("gma6")
class GMA6LM(LM):
    """A gma6 memory model (gated or RMT) as an lm-evaluation-harness ``LM``.

    Args:
        model: a memory model (``attach_memory`` / ``load_adapter``).
        tokenizer: its base's tokenizer.
        segment_length: tokens a window, BOS included.
        use_memory: False scores with the memory switched off (the bare base, same windows).
        max_gen_toks: default cap of ``generate_until`` (a task's ``max_gen_toks`` wins).
    """

    def __init__(self, model: Any, tokenizer: Any, segment_length: int = 512, use_memory: bool = True,
                 max_gen_toks: int = 32) -> None:
        super().__init__()
        if not hasattr(model, "init_state") or not hasattr(model, "memory_disabled"):
            raise TypeError(f"model must be a gma6 memory model (attach_memory/load_adapter), got {type(model).__name__}")
        if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 2:
            raise ValueError(f"segment_length={segment_length!r}: expected an int >= 2")
        self.model, self.tokenizer = model, tokenizer
        self.segment_length, self.use_memory, self.max_gen_toks = segment_length, use_memory, max_gen_toks
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.width = segment_length - 1 if self.bos is not None else segment_length
        self.model.eval()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GMA6LM:
        """``model_args`` of the harness: adapter, model, segment_length, use_memory, device, dtype, max_gen_toks."""
        from lm_eval.utils import simple_parse_args_string

        from .base import default_adapter, load_base, resolve_dtype
        from .model import load_adapter

        args = {**simple_parse_args_string(arg_string), **{k: v for k, v in (additional_config or {}).items()
                                                           if k in ("device",) and v is not None}}
        known = {"adapter", "model", "segment_length", "use_memory", "device", "dtype", "max_gen_toks"}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"gma6 model_args: unknown {sorted(unknown)}; known are {sorted(known)}")
        device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(args.get("dtype") or ("bfloat16" if str(device).startswith("cuda") else "float32"))
        base, tok = load_base(args.get("model"), dtype=dtype, device=device, progress=False)
        mm = load_adapter(base, args.get("adapter") or default_adapter())
        return cls(mm, tok, segment_length=int(args.get("segment_length", 512)),
                   use_memory=str(args.get("use_memory", True)).lower() not in ("false", "0", "no"),
                   max_gen_toks=int(args.get("max_gen_toks", 32)))

    # ------------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)).replace("/", "__")

    def _context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.use_memory else self.model.memory_disabled()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _window(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([([self.bos] if self.bos is not None else []) + ids], device=self.device)

    @torch.no_grad()
    def _score(self, ids: list[int], start: int) -> tuple[float, bool]:
        """Sum of log-probs of ``ids[start:]`` (and whether greedy decoding gives them)."""
        if not ids or start >= len(ids):
            return 0.0, True
        total, greedy = 0.0, True
        offset = 1 if self.bos is not None else 0
        with self._context():
            state = self.model.init_state(1)
            for a, b in windows_from_end(len(ids), self.width):
                window = self._window(ids[a:b])
                first = max(a, start)
                if offset == 0 and first == a:
                    first += 1  # without BOS the window's first token has nothing to be predicted from
                if first < b:
                    pos = torch.arange(first - a + offset - 1, b - a + offset - 1, device=self.device)
                    out = self.model(input_ids=window, memory_state=state, logits_to_keep=pos)
                    logp = F.log_softmax(out.logits[0].float(), dim=-1)
                    target = torch.tensor(ids[first:b], device=self.device)
                    total += float(logp.gather(1, target[:, None]).sum())
                    greedy = greedy and bool((logp.argmax(-1) == target).all())
                else:
                    out = self.model(input_ids=window, memory_state=state, logits_to_keep=1)
                state = out.memory_state
        return total, greedy

    # ------------------------------------------------------------------------------ harness API
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context)
            cont = self._encode(context + continuation)[len(ctx):] if context else self._encode(continuation)
            if not cont:
                raise ValueError(f"empty continuation after tokenization: {continuation!r}")
            results.append(self._score(ctx + cont, len(ctx)))
            self.cache_hook.add_partial("loglikelihood", req.args, results[-1])
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in requests:
            (text,) = req.args
            results.append(self._score(self._encode(text), 0)[0])
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, results[-1])
        return results

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or kwargs.get("temperature", 0) not in (0, 0.0, None):
                raise ValueError("GMA6LM.generate_until decodes greedily; do_sample/temperature are not supported")
            ids = self._encode(context)
            bounds = windows_from_end(len(ids), self.width) or [(0, 0)]
            with self._context():
                state = self.model.init_state(1)
                for a, b in bounds[:-1]:
                    state = self.model(input_ids=self._window(ids[a:b]), memory_state=state,
                                       logits_to_keep=1).memory_state
                prompt = self._window(ids[bounds[-1][0]:bounds[-1][1]])
                eos = getattr(self.tokenizer, "eos_token_id", None)
                out = self.model.generate(prompt, memory_state=state, max_new_tokens=max_new, do_sample=False,
                                          pad_token_id=getattr(self.tokenizer, "pad_token_id", None) or 0,
                                          eos_token_id=eos)
            text = self.tokenizer.decode(out[0, prompt.shape[1]:].tolist(), skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            results.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results
