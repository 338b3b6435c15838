"""Train a tiny LLaMA (with grouped-query attention) on a local text, for offline LLM pruning runs.

No pretrained causal LM ships inside a package registry reachable here, and hub downloads are not
available offline, so the offline benchmark of ``benchmarks.llm_prune`` prunes a small LLaMA trained
on CPU by this script. It writes a Hugging Face model directory (weights, config, a byte-level BPE
tokenizer trained on the same text) that ``from_pretrained`` loads, plus the held-out split of the
text (``eval.txt``) and the training split (``train.txt``) used for calibration.

Usage:
    python -m benchmarks.llm_tiny_lm --text /usr/share/vim/vim90/doc/usr_*.txt --out /tmp/tiny-llama
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from connect_tp import llm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", nargs="+", required=True, help="text files, concatenated")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="tail of the text held out")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def main(argv=None):
    args = parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = "\n".join(open(path, encoding="utf-8", errors="replace").read() for path in args.text)
    cut = int(len(text) * (1 - args.eval_fraction))
    train_text, eval_text = text[:cut], text[cut:]
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    train_ids = llm.tokenize(tokenizer, train_text)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(256, args.seq_len), tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    model.train()
    start = time.time()
    for step in range(args.steps):
        batch = llm.calibration_batches(train_ids, args.batch_size, args.seq_len, seed=args.seed * 100003 + step)
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    for name, part in (("train.txt", train_text), ("eval.txt", eval_text)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write(part)
    eval_ppl = llm.perplexity(model, llm.tokenize(tokenizer, eval_text), seq_len=args.seq_len)
    info = {"args": vars(args), "train_tokens": int(train_ids.numel()), "eval_ppl": eval_ppl,
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.time() - start}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
