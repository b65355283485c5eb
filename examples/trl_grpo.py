"""GRPO with TRL on leanloss's engine: a tiny random Llama learns to prefer even-numbered words.

    python examples/trl_grpo.py --steps 20

Everything is built here (no download): a word-level tokenizer over ``w0 .. w{V-1}``, a
2-layer Llama, and prompts of random words. The reward is the share of even-numbered words
(``w0``, ``w2``, ...) in a completion: about 0.5 for the random model. ``apply_leanloss(trainer)`` puts leanloss's fused head behind TRL's
(log-probabilities and entropies of the policy and of the reference model, never holding the
(tokens, vocab) logits); everything else is TRL's ``GRPOTrainer`` as usual.
Needs ``pip install 'leanloss[trl]'``.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from leanloss.integrations.trl import apply_leanloss


def build_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def build_model(vocab: int, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config)


def even_words(completions, **kwargs) -> list:
    """The toy reward: the share of even-numbered words in each completion."""
    def share(text: str) -> float:
        words = [w for w in text.split() if w[1:].isdigit()]
        return sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1)
    return [share(c) for c in completions]


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, args.vocab - 3, (4,), generator=g))
               for _ in range(64)]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=12, temperature=1.0, beta=0.04, learning_rate=3e-3, logging_steps=1,
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", disable_tqdm=True,
    )
    model_dir = tempfile.mkdtemp()  # GRPO loads its reference model (beta > 0) from the policy's path
    build_model(args.vocab, args.hidden).save_pretrained(model_dir)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=even_words, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=build_tokenizer(args.vocab))
    apply_leanloss(trainer)  # the only leanloss line
    trainer.train()
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    print(f"mean reward: first step {rewards[0]:.2f}, last step {rewards[-1]:.2f}")
    return rewards


if __name__ == "__main__":
    main()
