"""A tokenizer trained here, for the tiny local models (no hub is reachable).

Byte-level BPE with Llama-3-style special tokens and a chat template that
renders both plain-string and multimodal (list of parts) message content, so
text and vision students share it. Production recipes load the real
checkpoint's tokenizer instead, through the same ``AutoTokenizer`` path.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
IMAGE_TOKEN = "<|image|>"
# MllamaProcessor looks this one up by name.
PYTHON_TAG = "<|python_tag|>"

# Llama-3 shape: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048,
                    with_image_token: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``.

    With ``with_image_token`` the ``<|image|>`` token is added last, so its id
    equals the text vocabulary size, as Mllama expects (``image_token_index``).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, HEADER_START, HEADER_END, PYTHON_TAG]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                      pad_token=PAD)
    if with_image_token:
        wrapped.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.padding_side = "right"
    return wrapped
