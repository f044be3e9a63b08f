"""The Q-Former's parts: config, text embeddings, BERT initialisation, ITG head and mask.

The Q-Former itself is transformers' ``Blip2QFormerModel`` (self-attention over queries and text,
cross-attention from the queries to the image every ``cross_attention_frequency`` layers, a
separate feed-forward branch for the queries). What it lacks for pretraining lives here: BERT
weights copied in as LAVIS does, a BERT masked-LM head tied to the word embeddings for the
image-grounded text generation (ITG) loss, and the UniLM attention mask that loss needs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    BertForMaskedLM,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from pipeline.assets import model_config, resolve_model, resolve_tokenizer
from pipeline.spec.model import QFormerSpec

DEC_TOKEN = "[DEC]"
"""Begin-of-sequence token of ITG captions; it replaces ``[CLS]``."""


def build_qformer_tokenizer(spec: QFormerSpec) -> PreTrainedTokenizerBase:
    """The caption tokenizer of the Q-Former: BERT WordPiece with ``[DEC]`` as its bos token.

    ``[DEC]`` is appended to the vocabulary, so ``[CLS] caption [SEP]`` ids are the same as with
    the plain BERT tokenizer; the data pipeline may use either.

    Args:
        spec: The Q-Former section of the model spec.

    Returns:
        The tokenizer; ``len(tokenizer)`` is the Q-Former's vocabulary size.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(spec.tokenizer or spec.bert))
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def load_bert_config(spec: QFormerSpec) -> PretrainedConfig:
    """The config of the BERT checkpoint the Q-Former is shaped after.

    Raises:
        ValueError: The checkpoint is not a BERT model, or has fewer layers than asked for.
    """
    config = model_config(spec.bert)
    if config.model_type != "bert":
        raise ValueError(f"qformer.bert must name a BERT model; {spec.bert} is {config.model_type}")
    if spec.num_hidden_layers and spec.num_hidden_layers > config.num_hidden_layers:
        raise ValueError(
            f"qformer.num_hidden_layers={spec.num_hidden_layers} but {spec.bert} has only "
            f"{config.num_hidden_layers} layers"
        )
    if spec.max_text_length > config.max_position_embeddings:
        raise ValueError(
            f"qformer.max_text_length={spec.max_text_length} exceeds the "
            f"{config.max_position_embeddings} positions of {spec.bert}"
        )
    return config


def qformer_config(
    spec: QFormerSpec,
    bert: PretrainedConfig,
    *,
    vision_width: int,
    vocab_size: int,
    text_input: bool,
    dropout: float | None = None,
) -> Blip2QFormerConfig:
    """Build the ``Blip2QFormerConfig`` for a BERT-shaped Q-Former.

    Args:
        spec: The Q-Former section of the model spec.
        bert: The BERT config from :func:`load_bert_config`.
        vision_width: Width of the image tokens the cross-attention reads.
        vocab_size: Caption vocabulary size, ``[DEC]`` included.
        text_input: Whether layers get the text feed-forward branch (stage 1 needs it).
        dropout: Hidden and attention dropout; None keeps the BERT's.
    """
    return Blip2QFormerConfig(
        vocab_size=vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=spec.num_hidden_layers or bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        hidden_dropout_prob=bert.hidden_dropout_prob if dropout is None else dropout,
        attention_probs_dropout_prob=bert.attention_probs_dropout_prob if dropout is None else dropout,
        max_position_embeddings=bert.max_position_embeddings,
        initializer_range=bert.initializer_range,
        layer_norm_eps=bert.layer_norm_eps,
        pad_token_id=bert.pad_token_id,
        cross_attention_frequency=spec.cross_attention_frequency,
        encoder_hidden_size=vision_width,
        use_qformer_text_input=text_input,
    )


def build_qformer(config: Blip2QFormerConfig) -> Blip2QFormerModel:
    """A randomly initialised Q-Former (BERT init: N(0, initializer_range) weights)."""
    # SDPA takes the boolean 4-D UniLM mask as it is.
    return Blip2QFormerModel._from_config(config, attn_implementation="sdpa")


def build_text_embeddings(config: Blip2QFormerConfig) -> Blip2TextEmbeddings:
    """Word and position embeddings of captions, BERT-initialised."""
    embeddings = Blip2TextEmbeddings(config)
    for table in (embeddings.word_embeddings, embeddings.position_embeddings):
        nn.init.normal_(table.weight, std=config.initializer_range)
    with torch.no_grad():
        embeddings.word_embeddings.weight[config.pad_token_id].zero_()
    return embeddings


class QFormerLMHead(nn.Module):
    """BERT's masked-LM head, its decoder tied to the caption word embeddings (as in LAVIS)."""

    def __init__(self, config: Blip2QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight
        nn.init.zeros_(self.decoder.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, H) text hidden states -> (B, T, V) next-token logits."""
        return self.decoder(self.transform(hidden_states))


def unilm_attention_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """The ITG self-attention mask: queries see queries; text sees all queries and earlier text.

    Args:
        text_mask: (B, T) 1 for caption tokens, 0 for padding.
        num_queries: Number of query tokens Q placed before the caption.

    Returns:
        (B, 1, Q + T, Q + T) boolean mask, True where a row may attend to a column.
    """
    batch, length = text_mask.shape
    total = num_queries + length
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    text_to_text = causal & text_mask.bool()[:, None, :]  # (B, T, T)
    mask = torch.zeros(batch, total, total, dtype=torch.bool, device=text_mask.device)
    mask[:, :, :num_queries] = True
    mask[:, num_queries:, num_queries:] = text_to_text
    return mask[:, None]  # (B, 1, Q + T, Q + T)


def copy_bert_weights(
    bert_name: str,
    qformer: Blip2QFormerModel,
    embeddings: Blip2TextEmbeddings | None = None,
    lm_head: QFormerLMHead | None = None,
) -> list[str]:
    """Initialise the Q-Former from a BERT checkpoint, as LAVIS does.

    Self-attention, text feed-forward and the embedding LayerNorm are copied; the query
    feed-forward branch is a copy of the text one; cross-attention keeps its random init. BERT's
    token-type-0 embedding, which it adds to every token, is folded into the position embeddings
    (the Q-Former has no token types). The masked-LM head is copied when the checkpoint has one.

    Args:
        bert_name: BERT checkpoint (resolved through ``pipeline.assets``).
        qformer: The Q-Former to fill, with at most as many layers as the checkpoint.
        embeddings: Caption embeddings to fill (stage 1), or ``None``.
        lm_head: ITG head to fill (stage 1), or ``None``.

    Returns:
        Names of Q-Former-side parameters left at their random init (cross-attention, and the
        LM head's transform if the checkpoint has no masked-LM head).
    """
    bert, info = BertForMaskedLM.from_pretrained(
        resolve_model(bert_name), dtype=torch.float32, output_loading_info=True
    )
    source = bert.state_dict()
    untouched = []
    with torch.no_grad():
        for name, param in qformer.state_dict().items():
            if ".crossattention." in name:
                untouched.append(f"qformer.{name}")
                continue
            param.copy_(source[_bert_name_of_qformer_param(name)])
        if embeddings is not None:
            _copy_embeddings(source, embeddings)
        if lm_head is not None:
            if any(key.startswith("cls.predictions.transform.") for key in info["missing_keys"]):
                names = [name for name, _ in lm_head.transform.named_parameters()]
                untouched += [f"lm_head.transform.{name}" for name in names]
            else:
                for name, param in lm_head.transform.state_dict().items():
                    param.copy_(source[f"cls.predictions.transform.{name}"])
                bias = source["cls.predictions.bias"]
                lm_head.decoder.bias[: bias.shape[0]].copy_(bias)
    return untouched


def _bert_name_of_qformer_param(name: str) -> str:
    if name.startswith("layernorm."):
        return "bert.embeddings.LayerNorm." + name.removeprefix("layernorm.")
    name = (
        name.replace(".attention.attention.", ".attention.self.")
        .replace(".intermediate_query.", ".intermediate.")
        .replace(".output_query.", ".output.")
    )
    return "bert." + name


def _copy_embeddings(source: dict[str, torch.Tensor], embeddings: Blip2TextEmbeddings) -> None:
    words = source["bert.embeddings.word_embeddings.weight"]  # (V_bert, H)
    embeddings.word_embeddings.weight[: words.shape[0]].copy_(words)
    positions = source["bert.embeddings.position_embeddings.weight"]  # (P, H)
    token_type_0 = source["bert.embeddings.token_type_embeddings.weight"][0]  # (H,)
    embeddings.position_embeddings.weight.copy_(positions + token_type_0)
