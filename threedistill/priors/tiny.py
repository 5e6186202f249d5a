"""Tiny randomly-initialized diffusers pipelines, written to disk in the standard folder layout.

They load through exactly the same code path as real weights (:class:`DiffusersPrior` reading
``model_index.json``), build in about a second, and run a forward pass in milliseconds on a CPU:
the tests and benchmarks use them (real runs use the shipped ``shapes`` prior or Stable Diffusion).

Two layouts, both with 64x64 images:

* ``kind="sd"``: a Stable-Diffusion-like latent pipeline. ``UNet2DConditionModel`` on 4x32x32
  latents, an ``AutoencoderKL`` with two levels (scale factor 2), CLIP text encoder + tokenizer,
  ``DDPMScheduler`` with SD's scaled-linear betas; ``prediction_type`` epsilon or v_prediction.
* ``kind="if"``: a DeepFloyd-IF-stage-I-like pixel pipeline. No VAE; the UNet sees 3x64x64 pixels
  and outputs 6 channels (epsilon + learned variance, ``variance_type="learned_range"``), with IF's
  block types (simple cross-attention with added K/V, text-pooled time embedding); cosine betas.
  The text encoder is CLIP by default or a tiny T5 (``text_encoder="t5"``), as in real IF.

Nothing is downloaded: the tokenizers are built from small in-code vocabularies (a byte-level BPE
vocabulary for CLIP, a character-level unigram vocabulary for T5).

Command line::

    python -m threedistill.priors.tiny OUT_DIR [--kind sd|if] [--prediction-type epsilon|v_prediction]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from threedistill.atomic import atomic_write_text
from threedistill.priors.diffusers_prior import quiet_transformers_progress

TINY_IMAGE_RESOLUTION = 64
TINY_TEXT_DIM = 32
TINY_MAX_TOKENS = 77

# A handful of BPE merges so that common words become fewer tokens than characters (the exact
# list does not matter: the model is random; it only has to be a valid, reloadable tokenizer).
_CLIP_MERGES = [
    "t h", "th e</w>", "a n", "an d</w>", "e r", "i n", "o n", "r e", "e d</w>", "i s</w>",
    "o f</w>", "a t", "e n", "o r", "c u", "cu b", "cub e</w>", "v i", "vi e", "vie w</w>",
]


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to one printable unicode character
    (printable bytes map to themselves, the others to code points from 256 on)."""
    byte_values = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code_points = byte_values[:]
    n_remapped = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + n_remapped)
            n_remapped += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def _word_merges(word: str) -> List[str]:
    """BPE merges that join ``word`` left to right into the single token ``word</w>``."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = pieces[0]
    for piece in pieces[1:]:
        merges.append(f"{current} {piece}")
        current += piece
    return merges


def _clip_vocab_and_merges(words: Sequence[str] = ()) -> tuple[Dict[str, int], List[tuple[str, str]]]:
    """CLIP-style vocabulary: 256 byte chars, their ``</w>`` forms, merged tokens, special tokens.
    Each of ``words`` (lower-case ASCII) also gets merges that make it one token."""
    alphabet = sorted(_bytes_to_unicode().values(), key=lambda ch: ord(ch))
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    merges: List[tuple[str, str]] = []
    seen = set(tokens)
    # With whole words the generic merges are left out: they would split the words' merge chains.
    merge_list = [m for w in sorted(set(words), key=lambda w: (-len(w), w)) if len(w) > 1 for m in _word_merges(w)] if words else list(_CLIP_MERGES)
    for merge in merge_list:
        left, right = merge.split(" ")
        if (left, right) in merges:
            continue
        merges.append((left, right))
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(words: Sequence[str] = (), model_max_length: int = TINY_MAX_TOKENS):
    """A download-free ``CLIPTokenizer`` (byte-level BPE) in which each of ``words`` is one token."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges(words)
    # transformers 5: the vocabulary goes in as ``vocab=`` (dict) / ``merges=`` (list of pairs; plain
    # "a b" strings are rejected by the tokenizers backend); a ``vocab_file=`` keyword is silently
    # ignored (the tokenizer would then know only the 3 special tokens).
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_tiny_clip_tokenizer():
    """The tiny pipelines' ``CLIPTokenizer`` (``model_max_length`` 77)."""
    return build_clip_tokenizer()


def write_clip_vocab_files(folder: Path, words: Sequence[str] = ()) -> None:
    """Also write ``vocab.json`` / ``merges.txt`` (transformers 5 saves only ``tokenizer.json``;
    the slow ``CLIPTokenizer`` of transformers 4.x needs these two files)."""
    vocab, merges = _clip_vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_t5_tokenizer():
    """A download-free ``T5Tokenizer`` (character-level unigram; ``model_max_length`` 77)."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.'-!?"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    for word in ("the", "and", "a", "of", "view", "front", "side", "back", "overhead", "cube"):
        vocab.append(("\u2581" + word, -1.0))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TINY_MAX_TOKENS)


def _tiny_unet(kind: str, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if kind == "sd":
        return UNet2DConditionModel(
            sample_size=TINY_IMAGE_RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            # Cross-attention only at the 16x16 level keeps a forward pass cheap on a CPU.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TINY_TEXT_DIM,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    # DeepFloyd IF stage I block layout (ResNet up/down sampling, simple cross-attention with the
    # text added as extra keys/values, text-pooled embedding added to the time embedding).
    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_RESOLUTION,
        in_channels=3,
        out_channels=6,
        # Three levels (64, 32, 16 px) with cross-attention only at 16x16: cheap on a CPU.
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=64,
        encoder_hid_dim=TINY_TEXT_DIM,
        encoder_hid_dim_type="text_proj",
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        attention_head_dim=8,
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        time_embedding_act_fn="gelu",
    )


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_RESOLUTION,
    )


def _tiny_text_encoder(tokenizer, text_encoder: str, seed: int):
    torch.manual_seed(seed + 2)
    if text_encoder == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TINY_MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModel(config)
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _tiny_scheduler(kind: str, prediction_type: str):
    from diffusers import DDPMScheduler

    if kind == "sd":
        return DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type=prediction_type, clip_sample=False,
        )
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
        prediction_type=prediction_type, clip_sample=True, thresholding=True,
        dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
    )


def write_tiny_pipeline(path: str | Path, kind: str = "sd", prediction_type: str = "epsilon", seed: int = 0,
                        text_encoder: str = "clip") -> Path:
    """Write a tiny random pipeline folder at ``path`` and return its path.

    ``kind``: "sd" (latent, VAE factor 2, 4x32x32 latents) or "if" (pixel, 3x64x64, learned
    variance). ``prediction_type``: "epsilon" or "v_prediction". ``text_encoder``: "clip" or "t5"
    (T5 returns an attention mask, as DeepFloyd IF's does). Same arguments give the same weights.
    """
    if kind not in ("sd", "if"):
        raise ValueError(f"kind must be 'sd' or 'if', got {kind!r}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if text_encoder not in ("clip", "t5"):
        raise ValueError(f"text_encoder must be 'clip' or 't5', got {text_encoder!r}")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_clip_tokenizer() if text_encoder == "clip" else build_tiny_t5_tokenizer()
    components = {
        "unet": _tiny_unet(kind, seed),
        "text_encoder": _tiny_text_encoder(tokenizer, text_encoder, seed),
        "tokenizer": tokenizer,
        "scheduler": _tiny_scheduler(kind, prediction_type),
    }
    if kind == "sd":
        components["vae"] = _tiny_vae(seed)

    # What diffusers writes for a pipeline saved without its optional safety checker.
    extra: Dict[str, object] = dict(safety_checker=[None, None], feature_extractor=[None, None],
                                    requires_safety_checker=False)
    if kind == "if":
        extra["watermarker"] = [None, None]
    save_pipeline_folder(out, components, "StableDiffusionPipeline" if kind == "sd" else "IFPipeline", extra)
    if text_encoder == "clip":
        write_clip_vocab_files(out / "tokenizer")
    return out


def save_pipeline_folder(out: Path, components: Dict[str, object], class_name: str,
                         extra_index: Optional[Dict[str, object]] = None) -> Path:
    """Save each component with ``save_pretrained`` into ``out/<name>`` and write the
    ``model_index.json`` that names its library and class (plus ``extra_index`` entries)."""
    from diffusers import __version__ as diffusers_version

    out.mkdir(parents=True, exist_ok=True)
    index: Dict[str, object] = {"_class_name": class_name, "_diffusers_version": diffusers_version}
    with quiet_transformers_progress():
        for name, component in components.items():
            component.save_pretrained(out / name)
            library = "diffusers" if type(component).__module__.startswith("diffusers") else "transformers"
            index[name] = [library, type(component).__name__]
    index.update(extra_index or {})
    atomic_write_text(out / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m threedistill.priors.tiny",
        description="Write a tiny random diffusers pipeline (for tests and the CPU quick start).",
    )
    parser.add_argument("out_dir", help="folder to write the pipeline into")
    parser.add_argument("--kind", choices=["sd", "if"], default="sd")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    parser.add_argument("--text-encoder", choices=["clip", "t5"], default="clip")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_pipeline(args.out_dir, kind=args.kind, prediction_type=args.prediction_type,
                               seed=args.seed, text_encoder=args.text_encoder)
    print(path)


if __name__ == "__main__":
    main()
