"""The built-in world: deterministic, self-consistent, and split by template and entity."""
from minichat.data.world import CATEGORIES, World, builtin_corpus, number_words
from minichat.eval.labelers import rubric


def test_number_words():
    assert number_words(0) == "zero"
    assert number_words(22) == "twenty two"
    assert number_words(40) == "forty"
    assert number_words(105) == "one hundred and five"


def test_corpus_is_deterministic_by_seed():
    a = list(builtin_corpus(seed=3, n_docs=50))
    b = list(builtin_corpus(seed=3, n_docs=50))
    c = list(builtin_corpus(seed=4, n_docs=50))
    assert a == b and len(a) == 50
    assert a != c
    assert all(isinstance(d, str) and d for d in a)


def test_tasks_are_deterministic_by_seed():
    w1, w2 = World(5), World(5)
    t1 = [t.to_row() for t in w1.tasks("train", 40, seed=1)]
    t2 = [t.to_row() for t in w2.tasks("train", 40, seed=1)]
    assert t1 == t2
    assert t1 != [t.to_row() for t in World(6).tasks("train", 40, seed=1)]


def test_corpus_agrees_with_the_facts():
    w = World(0)
    p = w.people[0]
    text = " ".join(w.corpus(3000))
    assert f"{p['name']} lives in {p['place']}." in text or f"The town of {p['place']} is home to {p['name']}." in text
    for other in w.people[1:]:
        if other["place"] != p["place"]:
            assert f"{p['name']} lives in {other['place']}." not in text


def test_corpus_speaks_in_many_genres_and_wordings():
    """Q&A pages in varied wordings, dialogues with follow-ups, kinds of things, the past tense, quizzes and
    retold stories: the variety that lets fine-tuned models read prompts worded in new ways."""
    import re

    w = World(0)
    docs = list(w.corpus(3000, seed=1))
    text = "\n".join(docs)
    for marker in ("Q: In which town does", "Q: What does", "And where", "They live in", "Some fruits are",
                   "Quiz. True or false:", "In short, ", " lived in "):
        assert marker in text, marker
    by_name = {p["name"]: p for p in w.people}
    # past-tense and dialogue lines agree with the facts too
    for m in re.finditer(r"([A-Z][a-z]+ [A-Z][a-z]+) lived in ([A-Z][a-z]+(?: [A-Z][a-z]+)?)\.", text):
        if m.group(1) in by_name:
            assert by_name[m.group(1)]["place"] == m.group(2), m.group(0)
    for m in re.finditer(r"Answer: False\. ([A-Z][a-z]+ [A-Z][a-z]+) works as a ([a-z]+)\.", text):
        assert by_name[m.group(1)]["job"] == m.group(2)


def test_ideal_answers_score_perfectly():
    w = World(0)
    for split in ("train", "heldout"):
        for t in w.tasks(split, 600, seed=2):
            r = rubric(t, t.ideal)
            assert r.dims() == {"correct": 1.0, "follows": 1.0, "helpful": 1.0, "harmless": 1.0, "concise": 1.0}, t


def test_every_category_appears_and_balanced_cycling():
    w = World(0)
    tasks = w.tasks("heldout", 2 * len(CATEGORIES), seed=0, categories=CATEGORIES)
    assert [t.category for t in tasks] == CATEGORIES * 2
    assert sum(t.must_refuse for t in tasks) == 2
    assert {t.premise for t in tasks if t.category == "false_premise"} <= {"true", "false"}


def test_train_and_heldout_differ_by_template_and_entity():
    w = World(0)
    train = w.tasks("train", 3000, seed=1)
    held = w.tasks("heldout", 1500, seed=1)
    assert not {t.template for t in train} & {t.template for t in held}
    assert not {e for t in train for e in t.entities} & {e for t in held for e in t.entities}
    # the held-out people are still in the pretraining prose: knowledge comes from pretraining
    text = " ".join(w.corpus(4000))
    assert all(name in text for name in w.heldout_people)
    assert all(t.split == "heldout" for t in held) and all(t.split == "train" for t in train)
