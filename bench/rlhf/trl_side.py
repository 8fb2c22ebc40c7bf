"""The TRL half of the RLHF benchmarks; run by bench_vs_trl.py with the Python of a bench-only environment
that has TRL (never a minichat dependency). Prints one JSON line with its measurements.

    python trl_side.py reward DATA.jsonl TOKENIZER_DIR BATCH      RewardTrainer, one epoch
    python trl_side.py grpo PROMPTS.jsonl TOKENIZER_DIR STEPS      GRPOTrainer, 16 completions x 48 tokens
"""
import json
import sys
import time

import torch

torch.set_num_threads(1)


def tokenizer(tok_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=f"{tok_dir}/tokenizer.json", pad_token="<|pad|>",
                                   eos_token="<|im_end|>")


def gpt2(vocab, tok):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_layer=4, n_head=4, n_embd=128, n_positions=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)


def reward(data, tok_dir, batch):
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok = tokenizer(tok_dir)
    rows = [json.loads(l) for l in open(data)]
    ds = Dataset.from_list([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows])
    torch.manual_seed(0)
    cfg = gpt2(len(tok), tok)
    cfg.num_labels = 1
    model = GPT2ForSequenceClassification(cfg)
    args = RewardConfig(output_dir="/tmp/trl_rm_bench", per_device_train_batch_size=batch, num_train_epochs=1,
                        learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to=[],
                        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, max_length=256)
    tr = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t = time.perf_counter()
    tr.train()
    dt = time.perf_counter() - t
    print(json.dumps({"trl_reward_pairs_per_s": len(rows) / dt, "trl_reward_time_s": dt, "pairs": len(rows)}))


def grpo(prompts, tok_dir, steps):
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import GRPOConfig, GRPOTrainer

    tok = tokenizer(tok_dir)
    rows = [json.loads(l) for l in open(prompts)]
    ds = Dataset.from_list([{"prompt": r["prompt_text"]} for r in rows])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2(len(tok), tok))

    def length_reward(completions, **kw):  # any cheap reward: GRPO's cost is generation + policy updates
        return [float(len(c)) / 100.0 for c in completions]

    times = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = GRPOConfig(output_dir="/tmp/trl_grpo_bench", per_device_train_batch_size=16, num_generations=16,
                      max_completion_length=48, max_steps=steps, learning_rate=1e-5, logging_steps=1000,
                      save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, temperature=1.0)
    tr = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=ds, processing_class=tok,
                     callbacks=[Timer()])
    tr.train()
    steady = times[1:] or times
    print(json.dumps({"trl_grpo_s_per_iter": sum(steady) / len(steady), "trl_grpo_iter_times": times}))


if __name__ == "__main__":
    kind = sys.argv[1]
    {"reward": reward, "grpo": grpo}[kind](sys.argv[2], sys.argv[3], int(sys.argv[4]))
