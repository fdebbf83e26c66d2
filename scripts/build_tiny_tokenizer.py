"""Build the small tokenizer kept in ``data/tiny_tokenizer/`` for the ``tiny`` profile.

A byte-level BPE with 1,024 entries, trained on the offline samples in ``data/*.jsonl``, plus
a ChatML chat template so that instruct notebooks can call ``apply_chat_template``.
Byte-level means every string can be encoded (no unknown tokens), however small the vocabulary.

Run from the repository root:  python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "tiny_tokenizer"
VOCAB_SIZE = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

# ChatML: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus() -> list[str]:
    texts = []
    for path in sorted((ROOT / "data").glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            texts.extend(json.loads(line)["text"] for line in handle if line.strip())
    if not texts:
        raise SystemExit("No data/*.jsonl samples found: the tokenizer is trained on them.")
    return texts


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(OUT)
    print(f"Saved a {len(wrapped)}-token tokenizer to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
