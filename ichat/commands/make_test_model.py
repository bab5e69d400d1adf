"""``ichat make-test-model DIR``: a random-weight Llama with a BPE tokenizer trained here.

No weights can be downloaded on CI machines, so the project makes its own model:
a byte-level BPE tokenizer trained on a generated corpus (with a chat template) and a
``LlamaForCausalLM`` with random bf16 weights. head_dim is 64 or more: vLLM's CPU
attention kernel rejects smaller heads.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 4096


SHAPES = {
    # 0.6 M parameters: CI and unit of every CPU test.
    "tiny": ModelShape(128, 2, 2, 256, 1000),
    # 22 M parameters: CPU benchmarks with some compute per token.
    "small": ModelShape(512, 8, 8, 1376, 4000),
    # ~0.95 B parameters: GPU benchmarks.
    "1b": ModelShape(2048, 16, 16, 5632, 32000),
}


def _corpus(lines: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    words += ["hello", "world", "the", "a", "is", "what", "model", "answer", "question"]
    for _ in range(lines):
        sentence = " ".join(rng.choices(words, k=rng.randint(4, 16)))
        yield sentence.capitalize() + rng.choice([".", "?", "!", ","])


def train_tokenizer(vocab_size: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(20000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_test_model(
    out_dir: Path, shape: ModelShape, seed: int = 0, *, wide_margins: bool = False
) -> Path:
    """Write tokenizer, config and random bf16 weights to ``out_dir``; with
    ``wide_margins`` a model whose greedy choices are far from ties (``_widen_margins``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape.hidden_size // shape.num_attention_heads < 64:
        raise ValueError("head_dim must be >= 64 (vLLM's CPU attention rejects smaller)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(shape.vocab_size, seed)
    tokenizer.save_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=max(shape.vocab_size, len(tokenizer)),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if wide_margins:
        _widen_margins(model, seed, len(SPECIAL_TOKENS))
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(out_dir, safe_serialization=True)
    facts = {"shape": asdict(shape), "seed": seed, "wide_margins": wide_margins}
    (out_dir / "ichat-test-model.json").write_text(json.dumps(facts, indent=2) + "\n")
    return out_dir


def _widen_margins(model: Any, seed: int, specials: int) -> None:
    """Greedy choices with wide margins, for tests that compare an interrupted run with an
    uninterrupted one token by token. A random model's top two logits are often nearly
    tied, and an engine's batch-dependent rounding flips them (seen: SGLang on CPU, the
    same greedy request diverging after 108 tokens when other requests shared its
    batch). Here the residual stream stays close to the current token's embedding
    (attention and MLP outputs scaled down 100 times) and the output head maps each
    token's embedding to one successor, along one cycle through every ordinary token
    (the ``specials`` first ids, the special tokens, are never generated: each leads into
    the cycle): the successor's logit is about sqrt(hidden_size) above the rest, far
    beyond rounding. The attention still reads the context (its small share), so the
    model stays a transformer the engines run as any other."""
    import torch

    embed = model.model.embed_tokens.weight
    vocab, hidden = embed.shape
    generator = torch.Generator().manual_seed(seed)
    unit = torch.randn(vocab, hidden, generator=generator)
    unit /= unit.norm(dim=1, keepdim=True)
    order = torch.randperm(vocab - specials, generator=generator) + specials
    successor = torch.empty(vocab, dtype=torch.long)
    successor[order] = order.roll(-1)  # one cycle: order[i] -> order[i + 1]
    successor[:specials] = order[:specials]  # a special token leads into it
    head = torch.zeros(vocab, hidden).index_add_(0, successor, unit)  # t's direction
    with torch.no_grad():
        embed.copy_(unit * hidden**0.5)  # unit RMS, as the final norm leaves it
        model.lm_head.weight.copy_(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ichat make-test-model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model to")
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wide-margins",
        action="store_true",
        help="greedy choices far from ties: an interrupted run can be compared with an "
        "uninterrupted one token by token",
    )
    args = parser.parse_args(list(argv))
    try:
        path = make_test_model(
            args.out_dir, SHAPES[args.size], args.seed, wide_margins=args.wide_margins
        )
    except ImportError as exc:
        print(
            f"ichat make-test-model: error: {exc}; install with: pip install "
            "'ichat[model]' (or an engine extra)",
            file=sys.stderr,
        )
        return 2
    print(path)
    return 0
