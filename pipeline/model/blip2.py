"""The BLIP-2 pretraining model: frozen towers, trainable Q-Former, and the losses of both stages.

Parameter names follow transformers' Blip2 classes (``query_tokens``, ``embeddings.*``,
``qformer.*``, ``vision_projection``, ``text_projection``, ``itm_head``, ``language_projection``)
so a trained model exports to ``Blip2ForImageTextRetrieval`` / ``Blip2ForConditionalGeneration``;
``ln_vision`` corresponds to their ``vision_model.post_layernorm``. ``lm_head`` (the ITG head) and
``temp`` (the ITC temperature) exist only for pretraining.

Stage 1 runs three Q-Former passes per batch, like LAVIS: (1) queries + ``[DEC]`` caption under
the UniLM mask, whose query outputs serve ITC (queries attend only to queries and the image there,
so they equal an image-only pass) and whose text outputs serve ITG; (2) the caption alone for
ITC; (3) the 3B query + caption pairs for ITM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from pipeline.model.distributed import DistContext, all_gather, all_gather_with_grad, fetch_rows
from pipeline.model.frozen import ParameterCounts, count_parameters
from pipeline.model.losses import (
    contrastive_loss,
    generation_loss,
    language_model_labels,
    matching_loss,
    sample_hard_negatives,
)
from pipeline.model.qformer import (
    QFormerLMHead,
    build_qformer,
    build_qformer_tokenizer,
    build_text_embeddings,
    copy_bert_weights,
    load_bert_config,
    qformer_config,
    unilm_attention_mask,
)
from pipeline.model.towers import load_frozen_towers
from pipeline.model.vision import adopt_output_norm, encode_images, vision_width
from pipeline.spec.losses import Objective, losses_of
from pipeline.spec.model import ModelSpec


LANGUAGE_PROJECTION_INIT_STD = 0.002
"""Standard deviation of the fresh ``language_projection`` weights (its bias starts at 0)."""


@dataclass
class Stage1Output(ModelOutput):
    """Losses and intermediate tensors of one stage-1 step (B local pairs, N gathered pairs).

    A transformers ``ModelOutput`` (a dict as well as a dataclass) so that DeepSpeed ZeRO-3
    finds the output tensors and hooks its parameter gathering into their backward pass. Every
    field is set by the model; the ``None`` defaults are ``ModelOutput``'s convention.

    Attributes:
        loss: () weighted sum of the three losses; call ``backward()`` on it.
        loss_itc: () image-text contrastive loss of the local rows.
        loss_itm: () image-text matching loss of the local 3B pairs.
        loss_itg: () image-grounded caption generation loss of the local captions.
        temperature: (1,) the ITC temperature used, detached.
        sim_i2t: (B, N) local images vs gathered captions, divided by the temperature.
        sim_t2i: (B, N) local captions vs gathered images, divided by the temperature.
        itm_logits: (3B, 2) ITM logits: positives, then negative images, then negative captions.
        itg_logits: (B, T, V) next-token logits at every caption position.
        query_output: (B, Q, H) last-layer query outputs of the local images.
        negative_texts: (B,) gathered-batch index of the negative caption of each local image.
        negative_images: (B,) gathered-batch index of the negative image of each local caption.
    """

    loss: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    loss_itg: torch.Tensor | None = None
    temperature: torch.Tensor | None = None
    sim_i2t: torch.Tensor | None = None
    sim_t2i: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    itg_logits: torch.Tensor | None = None
    query_output: torch.Tensor | None = None
    negative_texts: torch.Tensor | None = None
    negative_images: torch.Tensor | None = None


@dataclass
class Stage2Output(ModelOutput):
    """Loss and logits of one stage-2 step (a ``ModelOutput``, see :class:`Stage1Output`).

    Attributes:
        loss: () weighted LM loss; call ``backward()`` on it.
        loss_lm: () the frozen LLM's mean next-token loss over caption tokens.
        logits: (B, Q + T, V) LLM logits over the visual prompt and the tokens.
        query_output: (B, Q, H) last-layer query outputs of the images.
    """

    loss: torch.Tensor | None = None
    loss_lm: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    query_output: torch.Tensor | None = None


class Blip2Pretrainer(nn.Module):
    """BLIP-2 for pretraining: stage 1 (ITC + ITM + ITG) or stage 2 (frozen-LLM captioning).

    Only ``query_tokens``, the Q-Former and its embeddings, the projections, the heads,
    ``ln_vision`` and ``temp`` train, and only they are the module's parameters; the vision tower
    and the LLM are frozen, stay in eval mode, and are held beside them in :attr:`towers` (never
    cast, partitioned or checkpointed with them). Stage 2 builds no caption-side parts (text
    feed-forward, embeddings, ITC/ITM/ITG heads) and stage 1 no ``language_projection``
    (:mod:`pipeline.model.parts`); a stage starts from another stage's result through
    ``pipeline.checkpoint.initial.load_initial_weights``.

    Data contract: ``pixel_values`` (B, 3, H, W) float32 normalised with
    :func:`pipeline.model.vision.image_preprocessing`; stage-1 ``input_ids`` are BERT ids of
    ``[CLS] caption [SEP]`` right-padded to ``qformer.max_text_length`` (the same length on every
    rank); stage-2 ``llm_input_ids`` are LLM ids of (prompt +) caption + eos, right-padded.

    Args:
        spec: The model spec.
        objective: 1 (Q-Former representation learning: BLIP-2's stage 1) or 2 (generative
            learning with the LLM: its stage 2).
        loss_weights: Weight of each loss of the objective by name (``pipeline.spec.losses``;
            a curriculum stage's ``losses``); absent losses weigh 0. None weighs each 1.
        tower_weights: False builds the frozen towers from their configs alone, reading none of
            their weights; under ``torch.device("meta")`` (with ``qformer.init: random``) the
            model then costs nothing and gives its parameters' names and shapes.
        qformer_dropout: The Q-Former's hidden and attention dropout; None keeps its BERT's.

    Example:
        >>> model = Blip2Pretrainer(spec, objective=1)
        >>> out = model(pixel_values=images, input_ids=ids, attention_mask=mask)
        >>> out.loss.backward()
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        objective: Objective = 1,
        loss_weights: Mapping[str, float] | None = None,
        tower_weights: bool = True,
        qformer_dropout: float | None = None,
    ):
        super().__init__()
        if objective not in (1, 2):
            raise ValueError(f"objective must be 1 or 2, got {objective!r}")
        self.spec, self.objective = spec, objective
        names = [loss.name for loss in losses_of(objective)]
        if loss_weights is not None and set(loss_weights) - set(names):
            raise ValueError(f"objective {objective} trains {names}, not {sorted(set(loss_weights) - set(names))}")
        self.loss_weights = {name: 1.0 if loss_weights is None else float(loss_weights.get(name, 0.0))
                             for name in names}
        q_spec = spec.qformer

        # Beside the trainable modules, not among them (see FrozenTowers); mapped from one file
        # per node, drawing no random numbers.
        self.towers = load_frozen_towers(spec, objective, weights=tower_weights)
        self.ln_vision = nn.LayerNorm(vision_width(self.vision_model))
        adopt_output_norm(self.vision_model, self.ln_vision)

        bert = load_bert_config(q_spec)
        vocab_size = bert.vocab_size
        if objective == 1:
            tokenizer = build_qformer_tokenizer(q_spec)
            self.dec_token_id = tokenizer.bos_token_id
            vocab_size = len(tokenizer)
        config = qformer_config(
            q_spec,
            bert,
            vision_width=vision_width(self.vision_model),
            vocab_size=vocab_size,
            text_input=objective == 1,
            dropout=qformer_dropout,
        )
        self.query_tokens = nn.Parameter(
            torch.randn(1, q_spec.num_query_tokens, config.hidden_size) * config.initializer_range
        )
        if objective == 1:
            self.embeddings = build_text_embeddings(config)
        self.qformer = build_qformer(config)

        if objective == 1:
            self.vision_projection = nn.Linear(config.hidden_size, q_spec.embed_dim)
            self.text_projection = nn.Linear(config.hidden_size, q_spec.embed_dim)
            self.itm_head = nn.Linear(config.hidden_size, 2)
            self.lm_head = QFormerLMHead(config, self.embeddings.word_embeddings)
            # Shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters.
            self.temp = nn.Parameter(torch.full((1,), spec.losses.init_temperature))
        else:
            llm_width = self.language_model.get_input_embeddings().embedding_dim
            self.language_projection = nn.Linear(config.hidden_size, llm_width)
            # Faint first prompts (norm ~0.5 for query outputs of norm ~10, beside SmolLM2's
            # token embeddings of ~3): the LLM starts from its captioning without the image and
            # the projection grows into it. nn.Linear's own init (prompts of norm ~7) left stage 2
            # at a loss of ~10 for 40-150 steps, as long as the draw of its weights decided.
            nn.init.normal_(self.language_projection.weight, std=LANGUAGE_PROJECTION_INIT_STD)
            nn.init.zeros_(self.language_projection.bias)

        if q_spec.init == "bert":
            copy_bert_weights(
                q_spec.bert,
                self.qformer,
                embeddings=getattr(self, "embeddings", None),
                lm_head=getattr(self, "lm_head", None),
            )

    @property
    def vision_model(self) -> nn.Module:
        """The frozen vision tower (held in :attr:`towers`, outside the trainable module)."""
        return self.towers.vision

    @property
    def language_model(self) -> nn.Module:
        """The frozen LLM of objective 2 (held in :attr:`towers`)."""
        if self.towers.language_model is None:
            raise AttributeError("a model of objective 1 has no language model")
        return self.towers.language_model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight, frozen towers included (``vision_model.*``, ``language_model.*``, as in
        transformers' Blip2 classes): what an export writes. ``state_dict()`` holds only the
        trainable modules."""
        held = {"vision_model.": self.towers.vision, "language_model.": self.towers.language_model}
        towers = {prefix + name: tensor for prefix, tower in held.items() if tower is not None
                  for name, tensor in tower.state_dict().items()}
        return {**self.state_dict(), **towers}

    def to(self, *args, **kwargs) -> "Blip2Pretrainer":
        """``nn.Module.to`` for the trainable modules; the frozen towers move to the device too,
        in their own dtype."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self.towers.to(device)
        return super().to(*args, **kwargs)

    @property
    def num_query_tokens(self) -> int:
        """Number of learned queries Q."""
        # From the spec, not the parameter: ZeRO-3 leaves partitioned parameters with shape (0,).
        return self.spec.qformer.num_query_tokens

    def forward(self, *, itm_seed: int = 0, **batch: torch.Tensor) -> Stage1Output | Stage2Output:
        """Run :meth:`forward_stage1` (with ``itm_seed``) or :meth:`forward_stage2`, whichever
        this model's objective is.

        DDP and DeepSpeed engines need the step to go through ``forward``.
        """
        if self.objective == 1:
            return self.forward_stage1(**batch, itm_seed=itm_seed)
        return self.forward_stage2(**batch)

    def parameter_bounds(self) -> dict[str, tuple[float, float]]:
        """Trainable parameters that must stay within bounds, by name: the ITC temperature (the
        forward clamps the value it uses; training keeps the optimizer's master inside too)."""
        if self.objective != 1:
            return {}
        losses = self.spec.losses
        return {"temp": (losses.min_temperature, losses.max_temperature)}

    def _weighted_total(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """() the stage's total loss: each loss of the objective (by output field) times its weight."""
        return sum(self.loss_weights[loss.name] * values[loss.output_field]
                   for loss in losses_of(self.objective))

    def _queries(self, batch: int) -> torch.Tensor:
        """(B, Q, H) the learned query tokens for a batch."""
        return self.query_tokens.expand(batch, -1, -1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, P, D) ``ln_vision``-normalised frozen tower tokens."""
        return self.normalize_image_tokens(self.frozen_image_tokens(pixel_values))

    def frozen_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, P, D) the frozen tower's output tokens, in its dtype, no graph."""
        return encode_images(self.vision_model, pixel_values)

    def normalize_image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, D) frozen tower tokens (any dtype, no graph) -> (B, P, D) after ``ln_vision``."""
        return self.ln_vision(features.to(self.ln_vision.weight.dtype))

    def query_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, P, D) image tokens -> (B, Q, H) last-layer outputs of the queries alone."""
        queries = self._queries(image_embeds.shape[0])  # (B, Q, H)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds)
        return out.last_hidden_state

    def forward_stage1(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        itm_seed: int = 0,
    ) -> Stage1Output:
        """Compute the stage-1 losses (ITC, ITM with hard negatives, ITG).

        Under ``torch.distributed``, features are gathered over the default process group; the
        per-rank losses average to the single-process loss on the concatenated batch, and so do
        DDP-averaged gradients.

        Args:
            pixel_values: (B, 3, H, W) normalised images.
            input_ids: (B, T) BERT ids of ``[CLS] caption [SEP]``, right-padded.
            attention_mask: (B, T) 1 for tokens, 0 for padding.
            itm_seed: Seeds the ITM hard-negative draws; pass the same on every rank (they draw
                over the gathered batch) and a new one each step.

        Returns:
            The losses and intermediate tensors.
        """
        if self.objective != 1:
            raise RuntimeError("forward_stage1 needs a model built with objective=1")
        ctx = DistContext.current()
        losses = self.spec.losses
        batch = input_ids.shape[0]
        temperature = self.temp.clamp(losses.min_temperature, losses.max_temperature)  # (1,)

        tower_tokens = self.frozen_image_tokens(pixel_values)  # (B, P, D), no graph
        image_embeds = self.normalize_image_tokens(tower_tokens)  # (B, P, D)
        query_output, itg_logits = self._generative_pass(image_embeds, input_ids, attention_mask)

        image_feats = self.image_features(query_output)  # (B, Q, E)
        text_feat = self.text_features(input_ids, attention_mask)  # (B, E)
        itc = contrastive_loss(
            image_feats,
            text_feat,
            all_gather_with_grad(image_feats, ctx),  # (N, Q, E)
            all_gather_with_grad(text_feat, ctx),  # (N, E)
            temperature,
            rank=ctx.rank,
            label_smoothing=losses.label_smoothing,
        )

        ids_all = all_gather(input_ids, ctx)  # (N, T)
        # Pairs whose captions are the same text are matches, never drawn as ITM negatives.
        same_caption = (ids_all[:, None, :] == ids_all[None, :, :]).all(dim=-1)  # (N, N)
        negative_texts, negative_images_all = sample_hard_negatives(
            all_gather(itc.sim_i2t, ctx), same_caption, seed=itm_seed
        )  # (N,) each
        local = slice(ctx.rank * batch, (ctx.rank + 1) * batch)
        negative_texts, negative_images = negative_texts[local], negative_images_all[local]  # (B,)
        # Only the B negative images this rank uses cross the network, as frozen tower tokens
        # (no gradient through the tower); ln_vision, replicated, is applied here.
        negative_tokens = fetch_rows(tower_tokens, negative_images_all, ctx)  # (B, P, D)
        itm_logits = self._matching_logits(
            image_embeds,
            input_ids,
            attention_mask,
            negative_image_embeds=self.normalize_image_tokens(negative_tokens),
            negative_ids=ids_all[negative_texts],
            negative_mask=all_gather(attention_mask, ctx)[negative_texts],
        )
        loss_itm = matching_loss(itm_logits)
        loss_itg = generation_loss(
            itg_logits, input_ids, attention_mask, label_smoothing=losses.label_smoothing
        )
        return Stage1Output(
            loss=self._weighted_total({"loss_itc": itc.loss, "loss_itm": loss_itm, "loss_itg": loss_itg}),
            loss_itc=itc.loss,
            loss_itm=loss_itm,
            loss_itg=loss_itg,
            temperature=temperature.detach(),
            sim_i2t=itc.sim_i2t,
            sim_t2i=itc.sim_t2i,
            itm_logits=itm_logits,
            itg_logits=itg_logits,
            query_output=query_output,
            negative_texts=negative_texts,
            negative_images=negative_images,
        )

    def _generative_pass(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries + ``[DEC]`` caption under the UniLM mask -> (B, Q, H) query outputs and
        (B, T, V) ITG logits."""
        hidden = self._generative_hidden(image_embeds, input_ids, attention_mask)  # (B, Q + T, H)
        return hidden[:, : self.num_query_tokens], self.lm_head(hidden[:, self.num_query_tokens :])

    def _generative_hidden(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, P, D) image tokens, (B, T) caption ids and mask -> (B, Q + T, H) last-layer
        outputs of the queries and of ``[DEC]`` + caption under the UniLM mask."""
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.dec_token_id
        queries = self._queries(input_ids.shape[0])  # (B, Q, H)
        return self.qformer(
            query_embeds=self.embeddings(input_ids=decoder_ids, query_embeds=queries),
            query_length=self.num_query_tokens,
            attention_mask=unilm_attention_mask(attention_mask, self.num_query_tokens),
            encoder_hidden_states=image_embeds,
        ).last_hidden_state

    def next_token_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The image-grounded text decoder (ITG) as a captioner: (B, P, D) ``encode_image``
        tokens and (B, T) ``[CLS]`` + caption so far -> (B, V) logits of the next caption token."""
        hidden = self._generative_hidden(image_embeds, input_ids, torch.ones_like(input_ids))  # (B, Q + T, H)
        return self.lm_head(hidden[:, -1])  # (B, V)

    def _matching_logits(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        negative_image_embeds: torch.Tensor,
        negative_ids: torch.Tensor,
        negative_mask: torch.Tensor,
    ) -> torch.Tensor:
        """ITM logits of (pos, pos), (neg image, pos caption), (pos image, neg caption): (3B, 2)."""
        ids = torch.cat([input_ids, input_ids, negative_ids])  # (3B, T)
        text_mask = torch.cat([attention_mask, attention_mask, negative_mask])  # (3B, T)
        images = torch.cat([image_embeds, negative_image_embeds, image_embeds])  # (3B, P, D)
        return self.match_logits(images, ids, text_mask)  # (3B, 2)

    def image_features(self, query_output: torch.Tensor) -> torch.Tensor:
        """(B, Q, H) query outputs -> (B, Q, E) L2-normalised ITC image features."""
        return F.normalize(self.vision_projection(query_output), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ``[CLS] caption [SEP]`` ids and mask -> (B, E) L2-normalised ITC text features
        (a text-only Q-Former pass; the ``[CLS]`` output is projected)."""
        text_output = self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids),
            query_length=0,
            attention_mask=attention_mask,
        ).last_hidden_state  # (B, T, H)
        return F.normalize(self.text_projection(text_output[:, 0]), dim=-1)

    def match_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits (no match, match) of image/caption pairs: (B, P, D) image tokens and (B, T)
        caption ids and mask -> (B, 2), the ``itm_head`` averaged over the query outputs."""
        queries = self._queries(input_ids.shape[0])  # (B, Q, H)
        query_mask = attention_mask.new_ones(queries.shape[:2])  # (B, Q)
        hidden = self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=self.num_query_tokens,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=image_embeds,
        ).last_hidden_state  # (B, Q + T, H)
        return self.itm_head(hidden[:, : self.num_query_tokens]).mean(dim=1)  # (B, 2)

    def visual_prompt(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images -> the (B, Q, H) query outputs and the (B, Q, D_llm) soft prompt
        they become for the frozen LLM, in the LLM's dtype."""
        query_output = self.query_image(self.encode_image(pixel_values))  # (B, Q, H)
        dtype = self.language_model.get_input_embeddings().weight.dtype
        return query_output, self.language_projection(query_output).to(dtype)

    def forward_stage2(
        self,
        pixel_values: torch.Tensor,
        llm_input_ids: torch.Tensor,
        llm_attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
    ) -> Stage2Output:
        """Compute the stage-2 loss: the frozen LLM captions the image from the query prompt.

        Args:
            pixel_values: (B, 3, H, W) normalised images.
            llm_input_ids: (B, T) LLM ids of (prompt +) caption followed by eos, right-padded.
            llm_attention_mask: (B, T) 1 for tokens, 0 for padding.
            prompt_lengths: (B,) leading prompt tokens of each row, excluded from the loss.

        Returns:
            The loss and logits.
        """
        if self.objective != 2:
            raise RuntimeError("forward_stage2 needs a model built with objective=2")
        query_output, visual_prompt = self.visual_prompt(pixel_values)  # (B, Q, H), (B, Q, D_llm)
        embed_tokens = self.language_model.get_input_embeddings()
        inputs_embeds = torch.cat([visual_prompt, embed_tokens(llm_input_ids)], dim=1)  # (B, Q + T, D_llm)
        prompt_mask = llm_attention_mask.new_ones(query_output.shape[:2])  # (B, Q)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=torch.cat([prompt_mask, llm_attention_mask], dim=1),
            labels=self.language_model_labels(llm_input_ids, llm_attention_mask, prompt_lengths),
            use_cache=False,
        )
        return Stage2Output(
            loss=self._weighted_total({"loss_lm": out.loss}),
            loss_lm=out.loss,
            logits=out.logits,
            query_output=query_output,
        )

    def language_model_labels(
        self,
        llm_input_ids: torch.Tensor,
        llm_attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) LLM ids and mask -> (B, Q + T) the stage-2 labels (see
        :func:`pipeline.model.losses.language_model_labels`), the LLM's begin-of-text input only."""
        return language_model_labels(
            llm_input_ids, llm_attention_mask, self.num_query_tokens, prompt_lengths,
            bos_token_id=self.language_model.config.bos_token_id,
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name (tied tensors once), detached: what to checkpoint."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Load trainable parameters saved by :meth:`trainable_state_dict`.

        Args:
            state_dict: Tensors by parameter name.
            strict: Raise unless the names match this model's trainable parameters exactly.
                Loading a stage-1 result into stage 2 needs ``strict=False``: its caption-side
                parts are unexpected there and ``language_projection`` is missing.

        Returns:
            ``(missing, unexpected)`` parameter names.

        Raises:
            KeyError: ``strict`` and the names differ.
        """
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(f"trainable state mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name in params.keys() & state_dict.keys():
                params[name].copy_(state_dict[name])
        return missing, unexpected

    def parameter_counts(self) -> ParameterCounts:
        """Numbers of trainable and frozen parameters (the towers')."""
        trainable = count_parameters(self)
        return ParameterCounts(trainable=trainable.trainable, frozen=trainable.frozen + self.towers.parameter_count())
