"""Models the bench makes: a tiny random Llama for the lines that measure overhead, not model speed."""

from __future__ import annotations

from pathlib import Path


def random_model(dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama (2 layers, hidden 256, float32) with `tokenizer_dir`'s tokenizer to `dest`.

    Its logits are near-uniform over the 49k-token vocabulary, so EOS is almost never sampled and every
    response runs to `max_tokens`: both sides of a comparison then generate the same number of tokens.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (dest / "config.json").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head size 64: vLLM's CPU attention wants multiples of 32
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    return dest
