"""The paper's parameter-count setting: LoRA vs MSPLoRA adapter sizes for RoBERTa-base and LLaMA-2-7B.

Both models are built from their published sizes on the meta device (no download, no memory) and counted
with ``msplora.count_parameters``; LoRA uses the largest MSPLoRA rank (8 for 8/4/2) on the same targets.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple


def roberta_base_config():
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1)


def llama2_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


SETTINGS: Tuple[Tuple[str, object, Sequence[str]], ...] = (
    ("RoBERTa-base", roberta_base_config, ("query", "value")),
    ("RoBERTa-base", roberta_base_config, ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                                          "output.dense")),
    ("LLaMA-2-7B", llama2_7b_config, ("q_proj", "v_proj")),
    ("LLaMA-2-7B", llama2_7b_config, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
)


def parameter_rows(ranks: Tuple[int, int, int] = (8, 4, 2), num_mid_groups: int = 3) -> List[Dict[str, object]]:
    """One row per (model, targets): LoRA and MSPLoRA adapter parameter counts, per scale and in total."""
    import msplora

    rows = []
    for model_name, make_config, targets in SETTINGS:
        config = msplora.MSPLoraConfig(target_modules=list(targets), ranks=ranks, num_mid_groups=num_mid_groups)
        counts = msplora.count_parameters(make_config(), config)
        rows.append({
            "model": model_name,
            "targets": list(targets),
            "target_layers": counts["num_target_layers"],
            "lora_rank": counts["lora_rank"],
            "lora": counts["lora"],
            "msplora_ranks": list(ranks),
            "msplora": counts["msplora"],
            "msplora_per_scale": counts["msplora_per_scale"],
            "ratio": counts["ratio"],
        })
    return rows


def _millions(value: int) -> str:
    return f"{value / 1e6:.3f}M"


def parameter_table_markdown(rows: Sequence[Dict[str, object]]) -> str:
    header = "| model | targets | layers | LoRA r={r} | MSPLoRA {ranks}: global | mid | layer | total | MSPLoRA / LoRA |"
    first = rows[0]
    lines = [
        header.format(r=first["lora_rank"], ranks="/".join(map(str, first["msplora_ranks"]))),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        scale = row["msplora_per_scale"]
        lines.append(
            f"| {row['model']} | {', '.join(row['targets'])} | {row['target_layers']} | {_millions(row['lora'])} | "
            f"{_millions(scale['global'])} | {_millions(scale['mid'])} | {_millions(scale['layer'])} | "
            f"{_millions(row['msplora'])} | {row['ratio']:.2f} |"
        )
    return "\n".join(lines)
