"""Make a tiny random-weight Llama model folder that vLLM can serve with `--load-format dummy`.

Runs under the vLLM venv's Python (it needs `tokenizers`), not the project's:

    .venv-vllm/bin/python tests/vllm/make_model.py OUT_DIR

A byte-level BPE tokenizer (vocab 4096) is trained on Python standard-library
sources, so the same interpreter always gives the same tokenizer; the model
config is a 2-layer Llama. There are no weights: vLLM fills them at random.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import string
import textwrap
from pathlib import Path

VOCAB = 4096
SPECIALS = ["<s>", "</s>", "<unk>"]
# Roles as plain text between <s> and </s>: the template needs no special tokens beyond these.
# Documents (RAG templates') and thinking (reasoning models') render as vLLM hands them over,
# as template arguments; tools, tool calls and tool call ids as JSON / text, so the prompt
# counts see them; a request without them renders as before.
CHAT_TEMPLATE = (
    "{% if documents %}{% for d in documents %}<s>document\n{{ d['text'] }}</s>\n"
    "{% endfor %}{% endif %}"
    "{% if tools %}<s>tools\n{{ tools | tojson }}</s>\n{% endif %}"
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}"
    "{% if message['tool_calls'] %}{{ message['tool_calls'] | tojson }}{% endif %}"
    "{% if message['tool_call_id'] %} {{ message['tool_call_id'] }}{% endif %}"
    # A variable of the template's own in every message (a client's chat_template_kwargs
    # set it), and the end token after each, as Zephyr's and Llama 2's templates write it.
    "{% if sep is defined %}{{ sep }}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
)


def training_text() -> list[str]:
    sources = [Path(m.__file__) for m in (argparse, dataclasses, json, string, textwrap)
               if m.__file__]
    sources.append(Path(json.__file__).with_name("decoder.py"))
    return [p.read_text(encoding="utf-8") for p in sources]


def make(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 512, "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        # The model must not emit ids the tokenizer cannot decode.
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("</s>"),
    }, indent=1))


if __name__ == "__main__":
    # (`--help` made a folder of that name: a tester's first try)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="the model folder to write")
    make(ap.parse_args().out_dir)
