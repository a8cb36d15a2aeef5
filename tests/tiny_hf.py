"""Tiny randomly initialised Hugging Face models saved to a folder, built in the test (nothing is
downloaded): a word-level tokenizer from a small vocabulary, a T5 encoder, a BLIP captioner and a
GPT-2 causal LM. Needs the `data` extra (transformers, tokenizers, torch)."""

import os

WORDS = (
    "a red blue green square moves right left camera pans across photo of cat cup coffee "
    "astronaut rocket slowly quickly the and in on with bright dark scene video shot"
).split()


def tokenizer(path, bos: bool = False):
    """A word-level fast tokenizer (pad 0, unk 1, end 2, start 3) that ends every text with </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if not bos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", 2)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
    )
    fast.save_pretrained(path)
    return fast


def vocab_size() -> int:
    return len(WORDS) + 4


def t5_encoder(path, width: int = 16) -> str:
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=vocab_size(),
        d_model=width,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=2,
    )
    T5EncoderModel(config).save_pretrained(path)
    tokenizer(path)
    return str(path)


def causal_lm(path) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size(),
        n_positions=512,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=3,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # tied embeddings: special tokens scale down, so greedy writes words
        model.transformer.wte.weight[:4] *= 0.01
    model.save_pretrained(path)
    tokenizer(path, bos=True)
    return str(path)


def blip_captioner(path, image_size: int = 32) -> str:
    """A BLIP image-captioning model (vision encoder + text decoder) and its processor."""
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(0)
    os.makedirs(path, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    text = dict(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        sep_token_id=3,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(path)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tok,
    )
    processor.save_pretrained(path)
    return str(path)
