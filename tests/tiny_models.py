"""Tiny random-weight models of every supported family, with small trained tokenizers, built in seconds."""

from __future__ import annotations

import functools

import torch

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome.",
    "The capital of Japan is Tokyo.",
    "Paris is the capital of France.",
    "Rome is located in Italy.",
    "Tokyo is a city in Japan.",
    "The mother tongue of Dante is Italian.",
    "The official language of France is French.",
    "Berlin is the capital of Germany.",
    "Danielle Darrieux was born in Bordeaux.",
    "The Eiffel Tower is in Paris, France.",
    "Madrid, Spain, and Lisbon, Portugal, are capitals.",
]

FAMILIES = ("bert", "gpt2", "llama", "mistral", "qwen2", "gemma3", "gpt_neox", "gptj")
CAUSAL_FAMILIES = tuple(f for f in FAMILIES if f != "bert")


@functools.lru_cache(maxsize=None)
def causal_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@functools.lru_cache(maxsize=None)
def masked_tokenizer():
    """WordPiece over a vocabulary built by hand, sorted: every word of the corpus whole, every character alone
    and as a continuation. (Training WordPiece breaks ties between equally frequent merges in hash order, so
    its vocabulary, and every tiny BERT test's numbers, changed from process to process.)"""
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizerFast

    words = {w for line in CORPUS for w, _ in BertPreTokenizer().pre_tokenize_str(line.lower())}
    chars = sorted({c for w in words for c in w})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + chars + [f"##{c}" for c in chars] + sorted(words - set(chars))
    raw = BertWordPieceTokenizer(vocab={t: i for i, t in enumerate(tokens)}, lowercase=True)
    return BertTokenizerFast(tokenizer_object=raw, mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]",
                             pad_token="[PAD]", unk_token="[UNK]")


def build_model(family: str, seed: int = 0, n_layers: int = 2, sliding_window: int = 4):
    """(model, tokenizer) for ``family``, fp32, eval mode, deterministic weights for a seed (``sliding_window``:
    gemma3's local attention span)."""
    import transformers as tf

    torch.manual_seed(seed)
    tok = masked_tokenizer() if family == "bert" else causal_tokenizer()
    vocab = len(tok)
    d, ff, heads = 32, 64, 4
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=heads,
                            intermediate_size=ff, max_position_embeddings=64)
        model = tf.BertForMaskedLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=d, n_layer=n_layers, n_head=heads, n_inner=ff, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif family in ("llama", "mistral", "qwen2"):
        cls_cfg, cls_model = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[family]
        cfg = cls_cfg(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=64)
        model = cls_model(cfg)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=n_layers,
                                  num_attention_heads=heads, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=64, sliding_window=sliding_window)
        model = tf.Gemma3ForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=n_layers,
                               num_attention_heads=heads, max_position_embeddings=64)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif family == "gptj":
        cfg = tf.GPTJConfig(vocab_size=vocab, n_embd=d, n_layer=n_layers, n_head=heads, n_inner=ff, n_positions=64, bos_token_id=0, eos_token_id=0,
                            rotary_dim=4)
        model = tf.GPTJForCausalLM(cfg)
    else:
        raise ValueError(family)
    model.float().eval()
    return model, tok


def tiny_km(family: str, seed: int = 0, n_layers: int = 2):
    """A KnModel around ``build_model(family, seed, n_layers)``, named "tiny-FAMILY"."""
    import kn_edit

    model, tok = build_model(family, seed=seed, n_layers=n_layers)
    return kn_edit.wrap(model, tok, name=f"tiny-{family}")


def prompt_for(family: str) -> tuple[str, str]:
    """(prompt, target) in the family's convention."""
    if family == "bert":
        return "The capital of France is [MASK].", "paris"
    return "The capital of France is", "Paris"
