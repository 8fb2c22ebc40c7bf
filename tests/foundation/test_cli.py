"""The command line as a user meets it: a real subprocess, real files, and the error messages."""
import subprocess
import sys

import pytest


def minichat(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "minichat.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def pretrain(tmp_path, *extra):
    return minichat("pretrain", "--preset", "tiny", "--train.out_dir", str(tmp_path / "run"),
                    "--train.progress", "false", *extra)


def test_help_and_unknown_verb():
    r = minichat("--help")
    assert r.returncode == 0 and "pretrain" in r.stdout and "chat" in r.stdout
    r = minichat("frobnicate")
    assert r.returncode == 2 and "unknown verb" in r.stderr


def test_pretrain_smoke_then_sample(tmp_path):
    r = pretrain(tmp_path, "--train.max_steps", "10")
    assert r.returncode == 0, r.stderr
    assert "--- samples ---" in r.stdout and "val_loss" in r.stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    r = minichat("sample", "--model", str(tmp_path / "run"), "--prompt", "Ada", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("Ada")


@pytest.mark.parametrize("setup,args,message", [
    (None, ["--data.corpus", "/no/such/file.txt"], "does not exist"),
    ("empty", [], "is empty"),
    ("small", ["--model.max_seq_len", "32"], "fewer than one sequence"),
    (None, ["--model.n_head", "3"], "must divide model.d_model"),
    (None, ["--model.n_layerz", "3"], "unknown config field"),
    (None, ["--train.lr", "fast"], "train.lr: expected a number"),
])
def test_clear_errors_without_traceback(tmp_path, setup, args, message):
    corpus = tmp_path / "c.txt"
    if setup == "empty":
        corpus.write_text("   \n")
        args = ["--data.corpus", str(corpus), *args]
    elif setup == "small":
        corpus.write_text("tiny corpus " * 3)
        args = ["--data.corpus", str(corpus), "--data.tokenizer", "char", *args]
    r = pretrain(tmp_path, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should go")
    r = pretrain(tmp_path, "--train.out_dir", str(blocker / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "minichat pretrain: error:" in r.stderr and str(blocker) in r.stderr
    r = minichat("pipeline", "--preset", "tiny", "--out_dir", str(blocker / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "minichat pipeline: error:" in r.stderr


def test_corrupted_checkpoint_on_resume(tmp_path):
    assert pretrain(tmp_path, "--train.max_steps", "5", "--sample.num_samples", "0").returncode == 0
    ck = tmp_path / "run" / "checkpoints"
    (ck / (ck / "latest").read_text().strip() / "config.json").write_text("{not json")
    r = pretrain(tmp_path, "--train.max_steps", "8")
    assert r.returncode == 2 and "corrupted" in r.stderr and "Traceback" not in r.stderr
