"""Tiny Hugging Face models built from configs (no downloads), shared by the model-level tests."""
import torch
import transformers as tf

VOCAB = 97


def llama(num_layers=7):
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg)


def gpt2(num_layers=4):
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=num_layers, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg)


def roberta(num_layers=3):
    cfg = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=num_layers,
                           num_attention_heads=4, max_position_embeddings=70, num_labels=2, pad_token_id=1)
    return tf.RobertaForSequenceClassification(cfg)


def bert(num_layers=2):
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=num_layers,
                        num_attention_heads=4, max_position_embeddings=64)
    return tf.BertModel(cfg)


# (name, builder, target_modules, layers per site)
CASES = [
    ("llama", llama, ["q_proj", "v_proj", "down_proj"], 7),
    ("gpt2-conv1d", gpt2, ["c_attn", "mlp.c_proj"], 4),
    ("roberta", roberta, ["query", "value", "output.dense"], 3),
    ("bert-all-linear", bert, "all-linear", 2),
]


def inputs(batch=2, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


def output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
