"""Chat and preference datasets: formats, the SFT loss mask, and bad input."""
import gzip
import json

import pytest

from minichat.data import chat as D
from minichat.errors import MinichatError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from minichat.data.world import builtin_corpus
    from minichat.tokenizer import BPETokenizer

    return BPETokenizer.train(list(builtin_corpus(seed=0, n_docs=100)), 300)


def test_sft_formats(tmp_path, jsonl):
    p = jsonl(tmp_path / "s.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"prompt": "2+2?", "response": "4"},
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"prompt": "empty", "response": "  "},
    ])
    rep = D.DataReport("sft")
    convs = D.load_sft(p, rep)
    assert len(convs) == 3 and rep.counts["empty_answers"] == 1
    assert convs[1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert convs[2][0]["content"] == "Add\n\n2 and 2"
    assert f"{p}:4" in rep.summary()


def test_sft_mask_trains_exactly_the_assistant_tokens(tok):
    conv = [{"role": "user", "content": "what is red"}, {"role": "assistant", "content": "a colour"},
            {"role": "user", "content": "and blue"}, {"role": "assistant", "content": "also one"}]
    ex = D.encode_sft([conv], tok, 200)[0]
    x, y, m = D.collate_sft([ex], tok.pad_id)
    trained = [int(t) for t, keep in zip(y[0], m[0]) if keep]
    # exactly both answers, each with its closing <|im_end|>, and nothing of the user turns or role headers
    assert tok.decode(trained) == "a colour<|im_end|>also one<|im_end|>"
    ids, mask = tok.render_chat(conv, add_generation_prompt=False)
    assert [i for i, k in zip(ids, mask) if k] == trained


def test_packing_keeps_whole_conversations_and_trains_the_same_tokens(tok):
    import random

    rng = random.Random(0)
    words = "red blue green sky sea tree stone bird".split()
    convs = [[{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 12)))},
              {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))}]
             for _ in range(60)]
    examples = D.encode_sft(convs, tok, 256)
    seqs = D.Sequences(examples, 256, tok.pad_id, pack=True)
    assert all(len(r.ids) <= 257 for r in seqs.rows)
    assert len(seqs) < len(examples) / 2  # several conversations per row
    # every conversation exactly once, whole: each row is its documents' ids in order
    pieces = sorted(tuple(r.ids[r.docs.index(j):len(r.docs) - r.docs[::-1].index(j)])
                    for r in seqs.rows for j in set(r.docs))
    assert pieces == sorted(tuple(e.ids) for e in examples)
    x, y, m, d = D.collate_sft(seqs.rows, tok.pad_id, with_docs=True)
    _, _, m1 = D.collate_sft(examples, tok.pad_id)
    assert m.sum() == m1.sum()  # the same assistant tokens are trained
    # no trained target is the first token of a conversation (predicted from the previous one)
    starts = (d[:, 1:] != d[:, :-1])
    assert not (m[:, :-1].bool() & starts).any()
    lengths = [len(r.ids) - 1 for r in seqs.rows]
    assert [int((row >= 0).sum()) for row in d] == lengths  # -1 marks exactly the padding


def test_sft_truncation_is_counted(tok):
    conv = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "yes"}]
    rep = D.DataReport()
    assert D.encode_sft([conv], tok, 20, rep) == []  # the answer fell outside the context: nothing to train
    assert rep.counts["conversations_truncated_to_context"] == 1
    assert rep.counts["conversations_with_nothing_to_train_after_truncation"] == 1


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(MinichatError, match=r"bad\.jsonl:3: malformed JSON"):
        D.load_sft(p)
    p.write_text('{"prompt": "a", "response": "b"}\n["not", "an", "object"]\n')
    with pytest.raises(MinichatError, match=r"bad\.jsonl:2: expected a JSON object"):
        D.load_sft(p)
    p.write_text('{"question": "a"}\n')
    with pytest.raises(MinichatError, match=r"bad\.jsonl:1: expected 'messages'"):
        D.load_sft(p)
    p.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(MinichatError, match=r"bad\.jsonl:1: message 0"):
        D.load_sft(p)


def test_preference_formats_and_rejections(tmp_path):
    rows = [
        {"prompt": "p1", "answers": ["a", "b", "c", "d"], "ranks": [0, 1, 1, 2]},  # ties
        {"prompt": "p2", "answers": ["only one"]},  # < 2 answers
        {"prompt": "p3", "answers": ["a", "", "b"]},  # empty answer dropped, 2 remain
        {"prompt": "p4", "answers": ["a", "b"], "ranks": [1, 1]},  # all tied
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: sure, here",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": "bad"},
        {"chosen": "\n\nHuman: x\n\nAssistant:", "rejected": "\n\nHuman: x\n\nAssistant: y"},  # empty chosen
    ]
    p = tmp_path / "prefs.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    rep = D.DataReport()
    comps = D.load_comparisons(p, rep)
    assert [c.prompt[-1]["content"] for c in comps] == ["p1", "p3", "joke?", "q"]
    assert comps[0].ranks == [0, 1, 1, 2] and comps[1].answers == ["a", "b"]
    hh = comps[2]
    assert [m["role"] for m in hh.prompt] == ["user", "assistant", "user"] and hh.answers == ["sure, here", "no"]
    assert comps[3].answers == ["good", "bad"]
    assert rep.counts["rankings_with_fewer_than_two_answers_skipped"] == 2  # p2, and the HH row with an empty answer
    assert rep.counts["empty_answers_dropped"] == 2
    assert rep.counts["rankings_with_all_answers_tied_skipped"] == 1


def test_hh_rows_that_differ_before_the_last_turn_are_skipped_and_counted(tmp_path, jsonl):
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
    with pytest.raises(MinichatError, match="x:1: 'chosen' and 'rejected' must share"):
        D.comparison_from_row(bad, "x:1")
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    p = jsonl(tmp_path / "hh.jsonl", [bad, good])
    rep = D.DataReport()
    comps = D.load_comparisons(p, rep)
    assert [c.answers for c in comps] == [["hello", "go away"]]
    assert rep.counts == {"pairs_that_differ_before_the_last_turn_skipped": 1} and rep.first[
        "pairs_that_differ_before_the_last_turn_skipped"] == f"{p}:1"
    only_bad = jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(MinichatError, match="no usable comparisons.*differ before the last turn"):
        D.load_comparisons(only_bad)


def test_encoded_comparisons_split_prompt_and_answers(tok):
    c = D.Comparison([{"role": "user", "content": "name a colour"}], ["red it is", "blue"], [0, 1])
    e = D.encode_comparisons([c], tok, 100)[0]
    for ans, text in zip(e.answers, c.answers):
        full, _ = tok.render_chat(c.prompt + [{"role": "assistant", "content": text}], add_generation_prompt=False)
        assert e.prompt + ans == full[:len(e.prompt) + len(ans)]
        assert ans[-1] == tok.im_end_id and tok.decode(ans[:-1]) == text


def test_too_long_prompt_is_truncated_from_the_left(tok):
    c = D.Comparison([{"role": "user", "content": "blah " * 80}], ["yes", "no"], [0, 1])
    rep = D.DataReport()
    e = D.encode_comparisons([c], tok, 30, rep)[0]
    assert max(len(e.prompt) + len(a) for a in e.answers) == 30
    assert rep.counts["prompts_truncated_from_the_left"] == 1
    assert e.answers[0][-1] == tok.im_end_id  # the answer survives whole


def test_prompt_files(tmp_path, jsonl):
    t = tmp_path / "p.txt"
    t.write_text("first\n\nsecond\n")
    assert [m[0]["content"] for m in D.load_prompts(t)] == ["first", "second"]
    j = jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"},
                                                                           {"role": "assistant", "content": "drop"}]}])
    assert D.load_prompts(j) == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]


def test_epoch_sampler_is_a_partition_of_the_global_batch():
    s = D.EpochSampler(10, seed=3)
    full = s.indices(4, 6)
    assert s.indices(4, 6, 0, 2) + s.indices(4, 6, 1, 2) == full
    assert sorted(s.indices(0, 5) + s.indices(1, 5)) == list(range(10))  # one epoch covers every example once


def test_prompts_from_a_pair_that_differs_before_the_last_turn_come_from_the_chosen_side(tmp_path, jsonl):
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
    p = jsonl(tmp_path / "p.jsonl", [bad])
    assert D.load_prompts(p) == [[{"role": "user", "content": "a"}]]


def test_openai_preference_rows():
    """OpenAI's DPO fine-tuning rows read as prompt/chosen/rejected; malformed ones are named."""
    from minichat.data.chat import comparison_from_row
    from minichat.errors import MinichatError

    c = comparison_from_row({"input": {"messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "hi"}]},
                             "preferred_output": [{"role": "assistant", "content": "Hello!"}],
                             "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}, "f:1")
    assert c.prompt[-1] == {"role": "user", "content": "hi"} and c.answers == ["Hello!", "Go away."] and c.ranks == [0, 1]
    with pytest.raises(MinichatError, match="f:2: 'non_preferred_output' must be a list ending with an assistant"):
        comparison_from_row({"input": {"messages": [{"role": "user", "content": "hi"}]},
                             "preferred_output": [{"role": "assistant", "content": "x"}],
                             "non_preferred_output": [{"role": "user", "content": "y"}]}, "f:2")
    with pytest.raises(MinichatError, match="'input' must be an object"):
        comparison_from_row({"input": "hi", "preferred_output": [], "non_preferred_output": []}, "f:3")
