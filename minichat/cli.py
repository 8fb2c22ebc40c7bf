"""`minichat <verb>`: dispatch to each stage's thin entry point.

Verbs map to "module:function" strings and are imported lazily, so `minichat --help` stays fast and
one stage's optional dependencies never break another stage.
"""
from __future__ import annotations

import importlib
import sys

# Each entry point takes argv (list[str]) and returns an exit code.
VERBS: dict[str, tuple[str, str]] = {
    "pretrain": ("minichat.train.pretrain:main", "pretrain a Transformer by next-token prediction"),
    "sample": ("minichat.sample:main", "sample text from a checkpoint"),
    "perplexity": ("minichat.perplexity:main", "perplexity and bits per byte of a model on a text corpus"),
    "sft": ("minichat.train.sft:main", "supervised fine-tuning on demonstrations"),
    "reward": ("minichat.train.reward:main", "train a reward model on rankings"),
    "rsft": ("minichat.train.rejection:main", "rejection-sampling fine-tuning (best of K by the RM)"),
    "ppo": ("minichat.train.ppo:main", "PPO-ptx against a reward model"),
    "dpo": ("minichat.train.dpo:main", "direct preference optimisation"),
    "bestofn": ("minichat.bestofn:main", "sample N answers, keep the reward model's favourite"),
    "chat": ("minichat.chat:main", "terminal chat (built-in SmolLM2 by default)"),
    "serve": ("minichat.serve.app:main", "OpenAI-compatible API and web chat"),
    "batch": ("minichat.serve.batches:main", "answer a file of OpenAI batch requests offline"),
    "feedback": ("minichat.serve.feedback:main", "export user feedback as comparisons"),
    "moderate": ("minichat.moderation.cli:main", "moderate text, or evaluate the moderator"),
    "eval": ("minichat.eval.cli:main", "evaluate models with labelers"),
    "pipeline": ("minichat.pipeline:main", "the whole InstructGPT recipe in one command"),
    "label": ("minichat.label.cli:main", "labeling app and export"),
    "export": ("minichat.gguf_export:main", "write a model as GGUF (llama.cpp, Ollama) or a Hugging Face folder"),
}


def _usage() -> str:
    lines = ["usage: minichat <verb> [options]   (minichat <verb> --help for a verb's options)", "", "verbs:"]
    for verb, (_, about) in VERBS.items():
        lines.append(f"  {verb:<10} {about}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from minichat import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"minichat: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = VERBS[verb][0]
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == mod_name or mod_name.startswith(e.name + ".")):
            print(f"minichat: verb {verb!r} is not available in this build ({e})", file=sys.stderr)
            return 2
        raise
    from minichat.errors import MinichatError

    try:
        return int(getattr(mod, fn_name)(rest) or 0)
    except MinichatError as e:
        print(f"minichat {verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's answer about a path (missing folder, permission, full disk): no traceback
        print(f"minichat {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nminichat {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
