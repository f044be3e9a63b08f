"""Our BLIP-2 weights <-> LAVIS's key names (``salesforce/LAVIS``, ``blip2_pretrained.pth``).

LAVIS's stage-1 model (``lavis/models/blip2_models/blip2_qformer.py``) holds its Q-Former as a
BERT masked LM, ``Qformer`` (``Qformer.py``): ``Qformer.bert.embeddings.{word_embeddings,
position_embeddings,LayerNorm}``, ``Qformer.bert.encoder.layer.N.{attention,crossattention}.
{self,output}``, each layer's ``intermediate``/``output`` (text) and ``intermediate_query``/
``output_query`` (queries) feed-forward branches, and the masked-LM head ``Qformer.cls.
predictions.{transform,bias}``; beside it ``query_tokens``, ``ln_vision``, ``vision_proj``,
``text_proj``, ``itm_head`` and the temperature ``temp``, a 0-dim parameter (ours has shape (1,),
which DeepSpeed can broadcast). Its stage-2 model (``blip2_opt.py``) drops the caption side and
adds ``opt_proj``, our ``language_projection``. The renames agree with transformers' own LAVIS
conversion script (``convert_blip_2_original_to_pytorch.py``): ``Qformer.bert.`` -> ``qformer.``,
``.self.`` -> ``.attention.``, ``embeddings.LayerNorm`` -> ``layernorm``, ``opt_proj`` ->
``language_projection``; that script drops the caption embeddings, heads and temperature, which
are kept here.

A LAVIS state dict (``model.state_dict()`` minus frozen parameters, as its runner saves it) also
holds copies that carry nothing of their own: the masked-LM decoder tied to the word embeddings
(``Qformer.cls.predictions.decoder.{weight,bias}``) and the ``position_ids`` buffer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# (our prefix, LAVIS prefix), most specific first.
_PREFIXES = (
    ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
    ("embeddings.", "Qformer.bert.embeddings."),
    ("qformer.", "Qformer.bert."),
    ("lm_head.transform.", "Qformer.cls.predictions.transform."),
    ("lm_head.decoder.bias", "Qformer.cls.predictions.bias"),
    ("vision_projection.", "vision_proj."),
    ("text_projection.", "text_proj."),
    ("language_projection.", "opt_proj."),
)
# Our attention modules are ``attention.attention``/``crossattention.attention``; LAVIS's ``.self``.
_OUR_LAYERS, _LAVIS_LAYERS = "qformer.encoder.layer.", "Qformer.bert.encoder.layer."
_OUR_ATTENTION = re.compile(r"\.(attention|crossattention)\.attention\.")
_LAVIS_ATTENTION = re.compile(r"\.(attention|crossattention)\.self\.")

_TIED_DECODER = "Qformer.cls.predictions.decoder."
_POSITION_IDS = "Qformer.bert.embeddings.position_ids"

# LAVIS's frozen towers -> ours: only the prefix matters, the towers are never loaded from here.
_FROZEN_TOWERS = (
    ("vision_model.", "visual_encoder."),
    ("language_model.", "opt_model."),
    ("language_model.", "t5_model."),
    ("language_model.", "llm_model."),
)


def to_lavis(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our trainable weights under LAVIS's names, as LAVIS's own state dict has them (with the
    tied decoder copies and the ``position_ids`` buffer)."""
    out = {}
    for name, tensor in state.items():
        if name == "temp":
            out["temp"] = tensor.reshape(())
            continue
        if name.startswith(_OUR_LAYERS):
            name = _OUR_ATTENTION.sub(r".\1.self.", name)
        out[_rename(name, to_lavis=True)] = tensor
    if "embeddings.word_embeddings.weight" in state:
        out[_TIED_DECODER + "weight"] = state["embeddings.word_embeddings.weight"]
    if "lm_head.decoder.bias" in state:
        out[_TIED_DECODER + "bias"] = state["lm_head.decoder.bias"]
    if "embeddings.position_embeddings.weight" in state:
        positions = state["embeddings.position_embeddings.weight"].shape[0]
        out[_POSITION_IDS] = torch.arange(positions).expand(1, -1)
    return out


def from_lavis(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LAVIS BLIP-2 state dict under our names, without the copies that carry nothing of their
    own. The frozen towers' weights (``visual_encoder.*``, ``opt_model.*``, ...) come out under
    our tower prefixes; names with no counterpart of ours are kept as they are."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(_TIED_DECODER) or name == _POSITION_IDS:
            continue
        if name == "temp":
            out["temp"] = tensor.reshape(1)
            continue
        if name.startswith(_LAVIS_LAYERS):
            name = _LAVIS_ATTENTION.sub(r".\1.attention.", name)
        out[_rename(name, to_lavis=False)] = tensor
    return out


def _rename(name: str, *, to_lavis: bool) -> str:
    for ours, lavis in (*_PREFIXES, *_FROZEN_TOWERS):
        old, new = (ours, lavis) if to_lavis else (lavis, ours)
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name
