"""The small LLaVA-style model and the adapter that lets the defense drive any `transformers`
vision-language model.

`build_model(ModelConfig())` makes a `LlavaForConditionalGeneration` from small configs (a CLIP
vision tower, LLaVA's two-layer projector, a Llama decoder), randomly initialised: nothing is
downloaded. The defense needs only four things of a model, and `VLMAdapter` gets them from any
model whose forward takes ``pixel_values`` and ``input_ids`` (LLaVA, PaliGemma, ...):

* the image geometry, from ``config.vision_config`` (``image_size``, ``patch_size``);
* the number of image tokens of the prompt (``config.image_seq_length`` or (S / P)^2);
* the last hidden states (``pyops.transformers.last_hidden_state``: the base model's output, the
  LM head run on the last position only via ``logits_to_keep=1``, so the full logits are never made);
* the LM head, ``model.get_output_embeddings()`` (weight and optional bias), through
  ``pyops.transformers.lm_head``: models whose logits are not ``lm_head(last hidden state)``
  (soft-capped, scaled) are refused when the adapter is made.

How examples become token ids and generations become answers is the model's `codec.Codec`.
`load_pretrained(path)` loads a local Hugging Face checkpoint (``--model PATH``) with the codec of
its processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from methods.common.optional import requires

from . import data as D


@dataclass
class ModelConfig:
    image_size: int = D.IMAGE_SIZE
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4


def build_model(cfg: ModelConfig = ModelConfig(), vocab_size: Optional[int] = None):
    with requires("hf"):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"build_model: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    vocab = vocab_size or D.build_tokenizer().get_vocab_size()
    vc = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    tc = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.text_hidden,
        intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=256,
        pad_token_id=D.PAD,
        bos_token_id=D.BOS,
        eos_token_id=D.EOS,
        tie_word_embeddings=False,
    )
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    lc = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_index=D.IMAGE,
        image_seq_length=n_img,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=D.PAD,
        bos_token_id=D.BOS,
        eos_token_id=D.EOS,
    )
    model = LlavaForConditionalGeneration(lc)
    model.generation_config.pad_token_id = D.PAD
    model.generation_config.eos_token_id = D.EOS
    model.generation_config.bos_token_id = D.BOS
    return model


class VLMAdapter:
    """What the defense needs of a `transformers` vision-language model (see the module doc)."""

    def __init__(self, model):
        self.model = model
        vc = getattr(model.config, "vision_config", None)
        if vc is None or not hasattr(vc, "image_size") or not hasattr(vc, "patch_size"):
            raise TypeError(
                f"VLMAdapter: {type(model).__name__} has no config.vision_config with image_size and "
                "patch_size; the defense needs a vision-language model with a ViT-style tower"
            )
        self.image_size, self.patch_size = int(vc.image_size), int(vc.patch_size)
        n = getattr(model.config, "image_seq_length", None)
        self.n_image_tokens = int(n) if n else (self.image_size // self.patch_size) ** 2
        from pyops.transformers import check_lm_head

        check_lm_head(model)

    def check_pixel_values(self, pixel_values: torch.Tensor, fn: str = "defense") -> None:
        s = self.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, s, s):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"{fn}: pixel_values must have shape (B, 3, {s}, {s}) for this vision tower "
                f"(image_size {s}, patch_size {self.patch_size}), got {shape}"
            )

    def head(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight (V, H), bias (V,) or None) of the LM head (``pyops.transformers.lm_head``)."""
        from pyops.transformers import lm_head

        return lm_head(self.model)

    def hidden_states(
        self, inputs: Dict[str, torch.Tensor], pixel_values: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Last-layer hidden states (B, L, H) of the text positions (before the LM head), from
        ``pyops.transformers.last_hidden_state``; `pixel_values` replaces the batch's images."""
        from pyops.transformers import last_hidden_state

        kw = {k: v for k, v in inputs.items() if k not in ("labels", "pixel_values")}
        pv = inputs["pixel_values"] if pixel_values is None else pixel_values
        self.check_pixel_values(pv)
        return last_hidden_state(self.model, pixel_values=self.to_model_dtype(pv), **kw)

    def to_model_dtype(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` in the dtype of the model's weights (a bfloat16 model gets bfloat16 images; a
        float32 model's are returned as they are)."""
        from pyops.transformers import unwrap_model

        dtype = unwrap_model(self.model).get_input_embeddings().weight.dtype
        return pixel_values if pixel_values.dtype == dtype else pixel_values.to(dtype)

    @torch.no_grad()
    def generate(self, examples: Sequence[D.Example], max_new_tokens: int = 14, batch: int = 128, codec=None):
        """Greedy answers (strings) to the examples' prompts: at most `max_new_tokens` new tokens,
        prompts made and answers decoded by `codec` (`codec.py`; default: the word-level tokenizer
        of `data.py` with this model's number of image tokens)."""
        from .codec import ToyCodec

        codec = ToyCodec(self.n_image_tokens) if codec is None else codec
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        texts = []
        for s in range(0, len(examples), batch):
            b = codec.collate(examples[s : s + batch], with_answers=False, pad_left=True)
            ids = b["input_ids"].to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=b["attention_mask"].to(device),
                pixel_values=self.to_model_dtype(b["pixel_values"].to(device)),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=codec.pad_id,
                eos_token_id=codec.eos_id,
            )
            texts += [codec.decode(row[ids.shape[1] :].tolist()) for row in out]
        model.train(was_training)
        return texts


def load_pretrained(path, dtype: str = "auto", device=None, flag: str = "--model"):
    """(model, codec) of a local Hugging Face vision-language checkpoint (LLaVA-1.5 style; nothing is
    downloaded: `methods.common.hf.load_vlm`), checked for what the pipeline needs: a ViT-style
    tower (`VLMAdapter`), logits that are the LM head of the last hidden state, and an image
    processor that makes the tower's pixel values (`codec.ProcessorCodec`). Errors name `flag`
    and the folder."""
    from methods.common.hf import load_vlm, model_dir

    from .codec import ProcessorCodec

    p = model_dir(path, flag)
    model, processor = load_vlm(p, dtype=dtype, device=None if device is None else str(device), flag=flag)
    try:
        adapter = VLMAdapter(model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{flag} {p}: {e}") from e
    codec = ProcessorCodec(processor, adapter.image_size, source=f"{flag} {p}")
    _check_image_tokens(model, codec, f"{flag} {p}")
    return model, codec


def _check_image_tokens(model, codec, source: str) -> None:
    """A LLaVA-style model: the processor must expand the image token to as many tokens as the tower
    gives features ((S / P)^2, one more with vision_feature_select_strategy "full"); an old snapshot
    without processor_config.json leaves a single one."""
    cfg = model.config
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    token = getattr(cfg, "image_token_id", None)
    token = getattr(cfg, "image_token_index", None) if token is None else token
    if strategy not in ("default", "full") or token is None:
        return
    vc = cfg.vision_config
    want = (int(vc.image_size) // int(vc.patch_size)) ** 2 + (strategy == "full")
    got = sum(int(t == token) for t in codec.probe()["ids"][0])
    if got != want:
        raise ValueError(
            f"{source}: its processor puts {got} image tokens in a prompt, but the vision tower gives {want} image "
            "features (processor_config.json's patch_size and vision_feature_select_strategy must match config.json)"
        )


def load_codec(path, image_size: int, flag: str = "--model"):
    """The `codec.ProcessorCodec` of a local checkpoint's processor alone (the weights are not loaded):
    for evaluating a model already in memory."""
    from methods.common.hf import model_dir

    from .codec import ProcessorCodec

    p = model_dir(path, flag)
    with requires("hf"):
        from transformers import AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{flag} {p}: cannot load its processor ({first})") from e
    return ProcessorCodec(processor, image_size, source=f"{flag} {p}")
