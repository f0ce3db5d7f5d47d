"""Tiny tokenizers built in code, for the tiny pipelines: no vocabulary files, no hub access.

Each has the real class and special tokens of its family's tokenizer but a vocabulary of single
characters or bytes (BPE without merges, or a character Unigram), so any prompt tokenizes and
the embedding tables stay a few hundred rows. Chat templates are reduced to the turns the
diffusers pipelines render.
"""

from __future__ import annotations


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to U+0100...
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def tiny_clip_tokenizer(model_max_length: int = 77):
    """CLIP byte-level BPE with no merges: each byte is a token, so any prompt tokenizes."""
    from transformers import CLIPTokenizer

    alphabet = list(_byte_to_unicode().values())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + i for i, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """T5 Unigram over single printable ASCII characters, with and without the word-start marker."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for code in range(ord("!"), ord("~") + 1):
        pieces += [("▁" + chr(code), -3.0), (chr(code), -4.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)


def tiny_qwen2_tokenizer():
    """Qwen2 byte-level BPE with no merges, plus the chat and vision special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_to_unicode().values())}
    vocab.update({token: len(vocab) + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    # Registered as special so "<|im_start|>" in a chat template is one token, not 12 bytes.
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    return tokenizer


# Qwen3's chat format, reduced to what Z-Image and FLUX.2 klein render: user turns, the assistant
# header, and the empty think block that enable_thinking=False adds.
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def tiny_qwen3_tokenizer():
    """The tiny Qwen2 tokenizer with a Qwen3-style chat template."""
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    return tokenizer


LLAMA3_SPECIAL_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
MISTRAL_SPECIAL_TOKENS = (
    "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
)


def tiny_llama_tokenizer(special_tokens: tuple[str, ...] = LLAMA3_SPECIAL_TOKENS):
    """Llama BPE over printable ASCII with byte fallback, plus the given chat special tokens."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    symbols = ["<unk>", "<s>", "</s>", "<pad>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
    symbols += [chr(code) for code in range(ord("!"), ord("~") + 1)]
    symbols += special_tokens
    tokenizer = LlamaTokenizer(
        vocab={symbol: i for i, symbol in enumerate(symbols)}, merges=[], pad_token="<pad>",
        padding_side="right",  # HunyuanVideo crops the template off the front, so pad at the back
        model_max_length=4096,
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    return tokenizer


# Mistral-Small-3's format for the text-only system + user turns that Flux2Pipeline sends.
_MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- set text = message['content'] if message['content'] is string else message['content'][0]['text'] %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}{%- endfor %}"
)


def tiny_mistral3_tokenizer():
    """The tiny Llama tokenizer with Mistral-3 special tokens and chat template.

    FLUX.2-dev ships a PixtralProcessor, which transformers only builds with torchvision
    installed; Flux2Pipeline only calls apply_chat_template on it, which a tokenizer has too.
    """
    tokenizer = tiny_llama_tokenizer(MISTRAL_SPECIAL_TOKENS)
    tokenizer.chat_template = _MISTRAL3_CHAT_TEMPLATE
    return tokenizer
