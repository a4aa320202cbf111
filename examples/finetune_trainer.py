"""A complete causal-LM fine-tune with MSPLoRA and the Hugging Face ``Trainer``.

The model is loaded with ``from_pretrained`` (``--model``), MSPLoRA is applied to its attention projections
(or ``--targets``), and ``msplora.MSPLoraTrainer`` trains it; its checkpoints hold the adapter only, and
``--resume`` continues from the last one. ``--staged`` adds ``msplora.StagedTrainingCallback`` (global, then
mid, then layer scales). At the end the adapter is saved in ``OUTPUT/adapter`` and, with ``--export-peft``,
as a standard PEFT LoRA adapter in ``OUTPUT/peft-lora``.

Data: ``--text-file`` (plain text) or ``--dataset`` (a Hugging Face dataset name, e.g.
``yahma/alpaca-cleaned`` in the Alpaca prompt format; needs ``pip install datasets``). Texts are packed:
joined with EOS and cut into blocks of ``--block-size`` tokens, the loss on every token (the paper's
instruction tuning pads each example to 256 tokens instead). ``--smoke`` runs offline: a tiny random Llama
whose tokens are bytes, on generated text, through the same code path.

    python examples/finetune_trainer.py --model meta-llama/Llama-2-7b-hf --dataset yahma/alpaca-cleaned \\
        --ranks 64 32 16 --bf16 --batch-size 4 --grad-accum 32 --epochs 3 --lr 3e-4 --output runs/alpaca
    python examples/finetune_trainer.py --smoke --output /tmp/smoke

Multi-GPU: ``examples/ddp_torchrun.sh`` starts this script under ``torchrun`` (the Trainer uses DDP).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import random
from typing import Dict, List, Optional, Sequence

import torch

import msplora
from msplora import MSPLoraConfig, MSPLoraTrainer, StagedTrainingCallback

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}"
)
SMOKE_WORDS = "the a river stone light field carries holds over under quietly brightly north south".split()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a causal LM name or path for from_pretrained")
    p.add_argument("--text-file", help="plain-text training data")
    p.add_argument("--dataset", help="a Hugging Face dataset name (needs the datasets package)")
    p.add_argument("--dataset-split", default="train")
    p.add_argument("--smoke", action="store_true", help="offline: tiny random Llama, byte tokens, generated text")
    p.add_argument("--output", help="output directory (checkpoints, adapter); with --smoke, default a temporary folder")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--ranks", nargs=3, type=int, default=[8, 4, 2], metavar=("GLOBAL", "MID", "LAYER"))
    p.add_argument("--alphas", nargs=3, type=float, default=[16.0, 16.0, 16.0])
    p.add_argument("--mid-groups", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--staged", action="store_true", help="train global, then mid, then layer scales")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--save-steps", type=int, default=200)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--export-peft", action="store_true", help="also write a PEFT LoRA adapter")
    p.add_argument("--ddp-find-unused-parameters", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="for DDP; staged training needs true (the Trainer's default without gradient checkpointing)")
    args = p.parse_args(argv)
    if not args.smoke and not args.model:
        p.error("give --model (or --smoke for the offline run)")
    if not args.smoke and not (args.text_file or args.dataset):
        p.error("give --text-file or --dataset (or --smoke)")
    if args.output is None:
        if not args.smoke or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            p.error("give --output (where checkpoints and the adapter go; under torchrun every process needs the same)")
        args.output = tempfile.mkdtemp(prefix="msplora-smoke-")
    return args


class ByteTokenizer:
    """One token per UTF-8 byte: the smoke run's tokenizer, so that nothing is downloaded."""

    vocab_size = 256

    def __call__(self, text: str) -> Dict[str, List[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def load_model_and_tokenizer(args: argparse.Namespace):
    import transformers as tf

    if args.smoke:
        torch.manual_seed(args.seed)
        config = tf.LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=args.block_size)
        return tf.LlamaForCausalLM(config), ByteTokenizer()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = tf.AutoTokenizer.from_pretrained(args.model)
    return model, tokenizer


def load_texts(args: argparse.Namespace) -> List[str]:
    if args.smoke:
        rng = random.Random(args.seed)
        return [" ".join(rng.choice(SMOKE_WORDS) for _ in range(rng.randint(8, 20))) + "." for _ in range(400)]
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            return [f.read()]
    from datasets import load_dataset  # only this code path needs the datasets package

    rows = load_dataset(args.dataset, split=args.dataset_split)
    if {"instruction", "output"} <= set(rows.column_names):  # Alpaca-style instruction data
        return [ALPACA_TEMPLATE.format(
            context=", paired with an input that provides further context" if row.get("input") else "",
            instruction=row["instruction"], input_block=f"### Input:\n{row['input']}\n\n" if row.get("input") else "",
            output=row["output"]) for row in rows]
    if "text" in rows.column_names:
        return list(rows["text"])
    raise ValueError(f"dataset {args.dataset} has neither a 'text' column nor instruction/output columns")


class BlockDataset(torch.utils.data.Dataset):
    """Token blocks of equal length; labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def tokenize_into_blocks(texts: Sequence[str], tokenizer, block_size: int) -> torch.Tensor:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: List[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // block_size
    if n < 2:
        raise ValueError(f"the data has {len(ids)} tokens: too few for two blocks of {block_size}")
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


def build_datasets(args, tokenizer):
    blocks = tokenize_into_blocks(load_texts(args), tokenizer, args.block_size)
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))]
    n_eval = max(1, math.ceil(len(blocks) * args.eval_fraction))
    return BlockDataset(blocks[n_eval:]), BlockDataset(blocks[:n_eval])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    import transformers as tf

    args = parse_args(argv)
    tf.set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args)
    config = MSPLoraConfig(target_modules=args.targets, ranks=tuple(args.ranks), alphas=tuple(args.alphas),
                           num_mid_groups=args.mid_groups, dropout=args.dropout)
    msplora.apply_msplora(model, config)
    train_set, eval_set = build_datasets(args, tokenizer)

    training_args = tf.TrainingArguments(
        output_dir=args.output,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        lr_scheduler_type="cosine",
        eval_strategy="epoch",
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=10,
        bf16=args.bf16,
        seed=args.seed,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=args.ddp_find_unused_parameters,
    )
    trainer = MSPLoraTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                             callbacks=[StagedTrainingCallback()] if args.staged else [])
    if trainer.is_world_process_zero():
        msplora.print_trainable_parameters(model)
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    metrics["train_loss"] = result.training_loss
    trainer.save_model(os.path.join(args.output, "adapter"))
    if args.export_peft and trainer.is_world_process_zero():
        msplora.export_peft(model, os.path.join(args.output, "peft-lora"), task_type="CAUSAL_LM",
                            base_model_name_or_path=args.model)
    if trainer.is_world_process_zero():
        print(f"train loss {metrics['train_loss']:.4f} | eval loss {metrics['eval_loss']:.4f} | "
              f"adapter saved in {os.path.join(args.output, 'adapter')}")
    return metrics


def shut_down_distributed() -> None:
    """Destroy the process group torchrun's Trainer created, once the model (whose DDP reducer refers to it) is
    gone. Left to interpreter exit, gloo's threads can abort the process; destroyed right after a collective,
    its threads can still be releasing Python tensors and deadlock on the interpreter lock."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # the Trainer, the model and DDP's reducer sit in reference cycles
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    shut_down_distributed()
