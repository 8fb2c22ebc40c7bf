"""The same training code under torchrun: 2 CPU processes (gloo) follow the 1-process loss trajectory."""
import json
import os
import subprocess
import sys

import pytest


def _run(tmp_path, corpus, nproc, name):
    out = tmp_path / name
    args = ["pretrain", "--preset", "tiny", "--data.corpus", str(corpus), "--train.out_dir", str(out),
            "--train.max_steps", "12", "--train.batch_size", "8", "--train.log_every", "1",
            "--train.eval_every", "0", "--train.save_every", "0", "--train.progress", "false",
            "--sample.num_samples", "0", "--runtime.threads", "1"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "minichat.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "minichat.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"processes {nproc}" in r.stdout
    return [json.loads(l)["loss"] for l in open(out / "metrics.jsonl") if '"loss"' in l]


def test_two_processes_match_one(tmp_path, tiny_corpus):
    # each run trains the same deterministic tokenizer, so both see identical ids and batches
    one = _run(tmp_path, tiny_corpus, 1, "one")
    two = _run(tmp_path, tiny_corpus, 2, "two")
    assert len(one) == len(two) == 12
    for a, b in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert one[-1] < one[0]
