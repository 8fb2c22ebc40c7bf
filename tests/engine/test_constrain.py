"""Constrained decoding (minichat.constrain): every valid output stays possible token by token, no invalid one
is, and the engine's outputs under a grammar parse and follow their schema."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minichat.constrain import MAX_DEPTH, JSONGrammar, SchemaError, TokenVocab, response_format_grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "pet": {"type": ["object", "null"], "properties": {"kind": {"type": "string"}, "legs": {"type": "integer"}},
                "required": ["kind"], "additionalProperties": False},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
TREE = {  # recursive, through $defs
    "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                       "required": ["v"], "additionalProperties": False}},
    "$ref": "#/$defs/node",
}
LIST = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"const": 7}]}, "minItems": 1, "maxItems": 4}


@pytest.fixture(scope="module")
def tok():
    from minichat.tokenizer import BPETokenizer

    rng = random.Random(0)
    texts = []
    for _ in range(300):  # JSON-shaped text, so merges such as '": "' and '},' exist
        obj = {"name": rng.choice(["Ann", "Bo", "Cy"]), "age": rng.randint(0, 99), "tags": ["a", "b"][: rng.randint(0, 2)],
               "city": rng.choice(["Paris", "Rome"]), "ok": rng.random() < 0.5, "pet": None}
        texts.append(json.dumps(obj, indent=rng.choice([None, 2])))
        texts.append("The answer is yes, and the weather is fine today.")
    return BPETokenizer.train(texts, vocab_size=600)


@pytest.fixture(scope="module")
def vocab(tok):
    return TokenVocab(tok)


def feed(grammar, tok, text):
    """Feed the tokens of `text`; returns (index of the first token the grammar rejects or None, final state)."""
    state = grammar.start()
    for k, t in enumerate(tok.encode(text)):
        if not bool(state.allowed()[t]):
            return k, state
        assert state.advance(t)
    return None, state


_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
_int = st.integers(-10**6, 10**6)


def _value(schema):
    """A hypothesis strategy of values that follow the schemas above."""
    if schema is PERSON:
        pet = st.one_of(st.none(), st.fixed_dictionaries({"kind": _text}, optional={"legs": _int}))
        return st.fixed_dictionaries(
            {"name": _text, "age": _int, "city": st.sampled_from(["Paris", "Rome", "Oslo"])},
            optional={"height": st.floats(-1e6, 1e6, allow_nan=False), "tags": st.lists(_text, max_size=3),
                      "pet": pet, "ok": st.booleans()})
    if schema is TREE:
        return st.recursive(st.fixed_dictionaries({"v": _int}),
                            lambda kids: st.fixed_dictionaries({"v": _int, "kids": st.lists(kids, max_size=2)}),
                            max_leaves=5)
    if schema is LIST:
        return st.lists(st.one_of(_text, st.just(7)), min_size=1, max_size=4)
    # any JSON object
    scalars = st.one_of(st.none(), st.booleans(), _int, st.floats(allow_nan=False, allow_infinity=False), _text)
    anyv = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(_text, c, max_size=3)),
                        max_leaves=8)
    return st.dictionaries(_text, anyv, max_size=4).filter(lambda v: _depth(v) <= MAX_DEPTH)


def _depth(v) -> int:
    """Containers open inside each other at the deepest point."""
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    return 0


def _dump(value, style: int) -> str:
    if style == 0:
        return json.dumps(value, separators=(",", ":"))
    if style == 1:
        return json.dumps(value)
    return json.dumps(value, indent=2, ensure_ascii=True)


@pytest.mark.parametrize("schema", [None, PERSON, TREE, LIST], ids=["object", "person", "tree", "list"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), style=st.integers(0, 2))
def test_every_valid_value_can_be_generated(tok, vocab, schema, data, style):
    grammar = JSONGrammar(vocab, schema)
    value = data.draw(_value(schema))
    text = _dump(value, style)
    bad, state = feed(grammar, tok, text)
    assert bad is None, (text, bad)
    assert state.can_end and state.finished, text


@pytest.mark.parametrize("schema,text", [
    (None, '{"a": 1,}'),  # trailing comma
    (None, '{"a": 01}'),  # leading zero
    (None, '[1, 2]'),  # json_object: the root is an object
    (None, '{"a": tru}'),
    (None, '{"a": "x\ny"}'),  # raw control character inside a string
    (None, '{"a": "\\q"}'),  # unknown escape
    (PERSON, '{"name": "A", "age": 3}'),  # a required key missing at "}"
    (PERSON, '{"name": "A", "age": 3.5, "city": "Rome"}'),  # integer
    (PERSON, '{"name": "A", "age": 3, "city": "Berlin"}'),  # enum
    (PERSON, '{"name": "A", "name": "B", "age": 3, "city": "Rome"}'),  # a key twice
    (PERSON, '{"nick": "A"}'),  # not a property
    (PERSON, '{"name": 5}'),  # type
    (PERSON, '{"name": "A", "age": 3, "city": "Rome", "tags": ["a", "b", "c", "d"]}'),  # maxItems
    (PERSON, '{"name": "A", "age": 3, "city": "Rome", "pet": {"legs": 4}}'),  # nested required
    (TREE, '{"v": 1, "kids": [{"kids": []}]}'),
    (LIST, '[]'),  # minItems
    (LIST, '[8]'),  # neither a string nor the const
])
def test_invalid_values_are_rejected(tok, vocab, schema, text):
    bad, state = feed(JSONGrammar(vocab, schema), tok, text)
    assert bad is not None or not state.can_end, text


def test_whitespace_and_numbers_are_bounded(tok, vocab):
    g = JSONGrammar(vocab)
    assert feed(g, tok, "{" + " " * 20 + "}")[0] is None
    assert feed(g, tok, '{\n' + " " * 20 + '"a": 1}')[0] is None
    for text in ("{" + " " * 40 + "}", "{\n\n}", " {}", "{ \n}", '{"a": ' + "1" * 30 + "}"):
        assert feed(g, tok, text)[0] is not None, text


def _walk(grammar, vocab, rng, max_steps=400):
    """A random path through the grammar that prefers tokens with structure, to finish in reasonable time."""
    state, out = grammar.start(), []
    for _ in range(max_steps):
        if state.can_end:
            return "".join(out)
        ids = state.allowed().nonzero()[:, 0].tolist()
        assert ids, "a reachable state allows no token: " + "".join(out)
        closing = [i for i in ids if any(c in vocab.text[i] for c in '"}],:0123456789')]
        t = rng.choice(closing if closing and rng.random() < 0.7 else ids)
        assert state.advance(t)
        out.append(vocab.text[t])
    return None


@pytest.mark.parametrize("schema", [None, PERSON, TREE, LIST], ids=["object", "person", "tree", "list"])
def test_random_paths_give_valid_json_of_the_schema(vocab, schema):
    grammar, rng, done = JSONGrammar(vocab, schema), random.Random(1), 0
    for _ in range(40):
        text = _walk(grammar, vocab, rng)
        if text is None:
            continue
        value = json.loads(text, object_pairs_hook=_unique_keys)
        jsonschema.validate(value, schema or {"type": "object"})
        done += 1
    assert done >= 20


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    assert len(set(keys)) == len(keys), f"a key twice in one object: {keys}"
    return dict(pairs)


@pytest.mark.parametrize("schema", [None, {"type": "object", "additionalProperties": {"type": "integer"}}])
def test_a_key_may_not_come_twice_in_one_object(tok, vocab, schema):
    """JSON allows a repeated key but a parser keeps one value; a small model repeats one forever where allowed."""
    g = JSONGrammar(vocab, schema)
    ok = ['{"a": 1, "ab": 2, "b": 3}', '{"ab": 1, "a": 2}', '{"a": 1, "b": 2, "a\\"": 3, "\\u0061b": 4}']
    bad = ['{"a": 1, "a": 2}', '{"ab": 1, "b": 2, "ab": 3}', '{"a\\"b": 1, "a\\"b": 2}', '{"": 1, "": 2}']
    if schema is None:
        ok += ['{"a": {"a": 1, "b": [{"a": 1}, {"a": 2}]}, "b": {"a": {"a": 0}}}', '{"a": "a", "b": ["a", "a"]}']
        bad += ['{"a": {"x": 1, "b": 2, "x": 3}}', '{"a": [{"b": 1, "b": 1}]}']
    for text in ok:
        b, state = feed(g, tok, text)
        assert b is None and state.finished, text
    for text in bad:
        b, state = feed(g, tok, text)
        assert b is not None, text
        # refused where the repeat would close: the key can still go on, so the state is never a dead end
        assert not state.dead and state.allowed().any(), text


def test_a_used_key_is_refused_inside_one_token():
    """A token that opens and closes a whole key: read on a copy of the key tracker."""
    texts = ['{', '}', '"', 'a', 'b', ':', ',', ' ', '1', '"a"', ', "a"', '"b":']
    tok = _ListTokenizer(texts)
    g = JSONGrammar(TokenVocab(tok))
    s = g.start()
    for t in ['{', '"a"', ':', '1', ',']:
        assert s.advance(texts.index(t)), t
    rejected = s.rejected()
    assert bool(rejected[texts.index('"a"')]) and not bool(rejected[texts.index('"b":')])
    assert not bool(rejected[texts.index('"')])  # a key that starts with "a" is fine
    s.advance(texts.index('"'))
    s.advance(texts.index('a'))
    assert bool(s.rejected()[texts.index('"')]) and not bool(s.rejected()[texts.index('b')])


class _ListTokenizer:
    """Token i is texts[i], no special tokens: exact control over which texts share one token."""

    def __init__(self, texts):
        self.texts, self.vocab_size, self.special_ids = texts, len(texts), []

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_free_values_nest_at_most_max_depth(tok, vocab):
    g = JSONGrammar(vocab)
    deep = '{"a": ' * (MAX_DEPTH - 1) + '[]' + '}' * (MAX_DEPTH - 1)
    b, state = feed(g, tok, deep)
    assert b is None and state.finished
    assert feed(g, tok, '{"a": ' * MAX_DEPTH + '{}' + '}' * MAX_DEPTH)[0] is not None
    assert feed(g, tok, '{"a": ' + '[' * MAX_DEPTH + ']' * MAX_DEPTH + '}')[0] is not None


@pytest.mark.parametrize("schema,msg", [
    ({"type": "string"}, "root must be an object or an array"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "unknown type"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"$ref": "http://example.com/s.json"}, "only references inside the schema"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "not among the properties"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "non-empty list"),
])
def test_bad_schemas_are_clear_errors(vocab, schema, msg):
    with pytest.raises(SchemaError, match=msg):
        JSONGrammar(vocab, schema)


def test_response_format(vocab):
    assert response_format_grammar(vocab, None) is None
    assert response_format_grammar(vocab, {"type": "text"}) is None
    assert isinstance(response_format_grammar(vocab, {"type": "json_object"}), JSONGrammar)
    g = response_format_grammar(vocab, {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert g.nodes[g.root].kind == "object"
    with pytest.raises(SchemaError, match="json_schema"):
        response_format_grammar(vocab, {"type": "json_schema", "json_schema": {"schema": PERSON}})
    with pytest.raises(SchemaError, match="type must be"):
        response_format_grammar(vocab, {"type": "yaml"})


# ---------------------------------------------------------------------------------------------- the engine

@pytest.fixture(scope="module")
def engine(tok):
    from minichat.engine import Engine
    from minichat.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size + 8, n_layer=2, n_head=2, d_model=64, max_seq_len=1024))
    return Engine(model, tok, weights="fp32", max_batch=8)


def test_engine_outputs_follow_the_schema(engine, tok, vocab):
    from minichat.engine import SamplingParams

    g = JSONGrammar(vocab, PERSON)
    prompt = tok.encode("The answer is")
    reqs = [engine.submit(prompt, SamplingParams(max_tokens=600, temperature=t, seed=s, grammar=g))
            for t in (0.0, 1.0) for s in range(4)]
    while engine.has_unfinished():
        engine.step()
    finished = 0
    for r in reqs:
        c = r.completion()
        text = tok.decode(c.content_ids)
        assert all(t < tok.vocab_size for t in c.token_ids)  # never the model's padding rows
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(text), PERSON)
            finished += 1
        else:  # cut by max_tokens: still a prefix the grammar accepts
            assert feed(g, tok, text)[0] is None
    assert finished >= 1


def test_engine_ends_a_complete_value_without_end_of_turn_tokens(engine, tok, vocab):
    from minichat.engine import SamplingParams

    g = JSONGrammar(vocab, {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                            "additionalProperties": False})
    r = engine.submit(tok.encode("x"), SamplingParams(max_tokens=200, temperature=1.0, seed=3, grammar=g,
                                                      stop_token_ids=[]))
    while engine.has_unfinished():
        engine.step()
    c = r.completion()
    assert c.finish_reason == "stop"
    assert json.loads(tok.decode(c.token_ids)) in ({"ok": True}, {"ok": False})


def test_logit_bias(engine, tok):
    from minichat.engine import MinichatError, SamplingParams

    prompt = tok.encode("The answer is")

    def first(**kw):
        r = engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0, **kw))
        while engine.has_unfinished():
            engine.step()
        return r.output[0]

    greedy = first()
    assert first(logit_bias={greedy: -100}) != greedy
    target = (greedy + 7) % tok.vocab_size
    assert first(logit_bias={target: 100}) == target
    with pytest.raises(MinichatError, match="outside the vocabulary"):
        engine.submit(prompt, SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(MinichatError, match=r"\[-100, 100\]"):
        engine.submit(prompt, SamplingParams(logit_bias={1: 101.0}))


def test_a_vocabulary_without_the_needed_characters_ends_instead_of_failing():
    """A character model that has no '"': an object can open but no key can start, so the request ends (at its
    end-of-turn token, or at once without stop tokens) rather than emitting junk or failing in the engine."""
    from minichat.engine import Engine, SamplingParams
    from minichat.model import ModelConfig, Transformer
    from minichat.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["{ab:1,c"], with_specials=True)  # no quote, no closing brace, no whitespace
    g = JSONGrammar(TokenVocab(tok))
    state = g.start()
    assert state.advance(tok.encode("{")[0]) and state.dead and not state.can_end
    torch.manual_seed(0)
    eng = Engine(Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=64)),
                 tok, weights="fp32")
    r = eng.submit(tok.encode("ab"), SamplingParams(max_tokens=10, temperature=1.0, seed=0, grammar=g))
    r2 = eng.submit(tok.encode("ab"), SamplingParams(max_tokens=10, temperature=1.0, seed=0, grammar=g,
                                                     stop_token_ids=[]))
    while eng.has_unfinished():
        eng.step()
    c = r.completion()
    assert c.finish_reason == "stop" and tok.decode(c.content_ids) == "{"
    c2 = r2.completion()
    assert c2.finish_reason == "stop" and tok.decode(c2.token_ids) == "{"


def test_text_or_grammar(tok, vocab):
    """tool_choice "auto": free text, unless the output begins the call's prefix; then only a valid call."""
    from minichat.constrain import TextOrGrammar

    g = JSONGrammar(vocab, {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                            "additionalProperties": False}, prefix="<call>\n", suffix="\n</call>")
    auto = TextOrGrammar(g)

    def run(text):
        s = auto.start()
        for t in tok.encode(text):
            assert not bool(s.rejected()[t]), text
            s.advance(t)
        return s

    s = run("The answer is yes")
    assert s.free and s.can_end and not bool(s.rejected().any())
    s = run("<call>\n{\"ok\": true}\n</call>")
    assert s.inner is not None and s.finished
    s = run("<call>\n{\"ok\"")
    assert s.inner is not None and not s.can_end
    assert bool(s.rejected()[tok.encode("x")[0]])  # inside the call only the grammar's tokens
    s = run("<cat")
    assert s.free
    full = feed(g, tok, "<call>\n{\"ok\": false}\n</call>")
    assert full[0] is None and full[1].finished
    assert feed(g, tok, "{\"ok\": false}")[0] is not None  # the prefix is required


def test_repeated_values(tok, vocab):
    """Several tool calls in one reply: after a complete value and its suffix, the output may end or go on
    with the separator and another value; without `repeat`, it must end."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    one, two = '<c>{"ok": true}</c>', '<c>{"ok": true}</c>\n<c>{"ok": false}</c>'
    g = JSONGrammar(vocab, schema, prefix="<c>", suffix="</c>", repeat="\n")
    for text in (one, two, two + "\n" + one):
        bad, state = feed(g, tok, text)
        assert bad is None and state.can_end and not state.finished, text
    assert feed(g, tok, one + "\n")[1].can_end is False  # a separator commits to another value
    assert feed(g, tok, one + " <c>")[0] is not None
    single = JSONGrammar(vocab, schema, prefix="<c>", suffix="</c>")
    bad, state = feed(single, tok, one)
    assert bad is None and state.finished
    assert feed(single, tok, two)[0] is not None


def _schemas(depth: int = 2):
    """Random JSON Schemas of the supported keywords (a strategy)."""
    leaf = st.one_of(
        st.sampled_from([{"type": t} for t in ("string", "integer", "number", "boolean", "null")]),
        st.lists(st.one_of(st.integers(-20, 20), st.sampled_from(["a", "b", "ab", "x y"]), st.booleans(), st.none()),
                 min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
        st.sampled_from([{"const": 10}, {"const": "k"}, {"type": ["string", "null"]},
                         {"type": "integer", "minimum": -3, "maximum": 40}, {"type": "integer", "exclusiveMinimum": 7},
                         {"type": "string", "pattern": "^[a-c]{1,3}$"}, {"type": "string", "format": "date"},
                         {"type": "string", "minLength": 2, "maxLength": 4}, {"type": "string", "maxLength": 0}]),
    )
    if depth == 0:
        return leaf
    sub = _schemas(depth - 1)
    names = st.sampled_from(["a", "ab", "b", "k_1", "long name"])
    extra = st.sampled_from([False, False, True, {"type": "integer"}, {"enum": ["a", "b"]}])
    obj = st.tuples(st.dictionaries(names, sub, min_size=1, max_size=3), extra).flatmap(
        lambda t: st.sets(st.sampled_from(sorted(t[0]))).map(
            lambda req: {"type": "object", "properties": t[0], "required": sorted(req),
                         "additionalProperties": t[1]}))
    mapping = sub.map(lambda v: {"type": "object", "additionalProperties": v})  # a dict[str, V]
    arr = st.tuples(sub, st.integers(0, 2), st.integers(2, 4)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[2]})
    return st.one_of(leaf, obj, mapping, arr, st.lists(sub, min_size=2, max_size=3).map(lambda alts: {"anyOf": alts}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(props=st.dictionaries(st.sampled_from(["p", "q", "rr"]), _schemas(), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_random_schemas_give_valid_values(vocab, props, seed):
    """Soundness over the schema space: every output a random path completes is valid JSON of its schema, and
    no state a path reaches allows nothing."""
    schema = {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}
    grammar, rng = JSONGrammar(vocab, schema), random.Random(seed)
    for _ in range(3):
        text = _walk(grammar, vocab, rng, max_steps=300)
        if text is not None:
            jsonschema.validate(json.loads(text), schema)


OPEN = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["name"], "additionalProperties": {"type": "integer"}}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(_text.filter(lambda k: k not in ("name", "n")), _int, max_size=3),
       n=st.one_of(st.none(), _int), style=st.integers(0, 2))
def test_additional_properties_every_valid_value(tok, vocab, extra, n, style):
    """Keys besides the properties, with values of additionalProperties: any key text, escapes too, and keys
    that begin like a property ("na", "nn")."""
    value = {**extra, "name": "x", **({} if n is None else {"n": n})}
    text = _dump(value, style)
    bad, state = feed(JSONGrammar(vocab, OPEN), tok, text)
    assert bad is None and state.finished, (text, bad)


@pytest.mark.parametrize("schema,ok,bad", [
    (OPEN, ['{"name": "a", "na": 1}', '{"nn": 2, "name": "a", "n": 3}', '{"name": "a", "": 0}'],
     ['{"name": "a", "other": "s"}', '{"name": "a", "name": "b"}', '{"n": 1, "name": "a", "n": 2}', '{"x": 1}']),
    ({"type": "object", "additionalProperties": {"type": "integer"}},  # pydantic's dict[str, int]
     ['{}', '{"a": 1, "b": -2}'], ['{"a": "1"}', '{"a": 1.5}']),
    ({"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": True},
     ['{"a": true, "b": [1, {"c": null}]}', '{"zz": "x"}'], ['{"a": 1}']),
    ({"type": "object", "properties": {"a": {"type": "boolean"}}},  # absent next to properties: no other key
     ['{"a": true}'], ['{"b": 1}']),
    ({"type": "object", "additionalProperties": False}, ['{}'], ['{"a": 1}']),
])
def test_additional_properties(tok, vocab, schema, ok, bad):
    g = JSONGrammar(vocab, schema)
    for text in ok:
        b, state = feed(g, tok, text)
        assert b is None and state.finished, text
        jsonschema.validate(json.loads(text), schema)
    for text in bad:
        b, state = feed(g, tok, text)
        assert b is not None or not state.can_end, text
    with pytest.raises(SchemaError, match="additionalProperties must be"):
        JSONGrammar(vocab, {"type": "object", "additionalProperties": 3})


def test_string_lengths(tok, vocab):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}},
              "required": ["s"], "additionalProperties": False}
    g = JSONGrammar(vocab, schema)
    for ok in ("ab", "abcde", "a\\nb", "\\u00e9t\\u00e9"):  # an escape counts as one character
        assert feed(g, tok, '{"s": "' + ok + '"}')[0] is None, ok
    for bad in ("a", "", "abcdef", "The answer is yes"):
        assert feed(g, tok, '{"s": "' + bad + '"}')[0] is not None, bad
    with pytest.raises(SchemaError, match="minLength"):
        JSONGrammar(vocab, {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 1}}})


FORMATTED = {"type": "object", "properties": {
    "day": {"type": "string", "format": "date"}, "at": {"type": "string", "format": "date-time"},
    "id": {"type": "string", "format": "uuid"}, "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
    "note": {"type": "string", "pattern": "ok", "maxLength": 6}},
    "required": ["day", "at", "id", "code", "note"], "additionalProperties": False}


def _formatted_ok(value) -> bool:
    """Checked by Python's datetime, re and uuid, not by the automaton under test."""
    import datetime
    import re
    import uuid

    datetime.date.fromisoformat(value["day"])  # a real calendar date (no 30 February)
    assert "T" in value["at"]
    datetime.datetime.fromisoformat(value["at"].replace("Z", "+00:00"))
    uuid.UUID(value["id"])
    return bool(re.fullmatch(r"[A-Z]{2}-\d{3}", value["code"]) and "ok" in value["note"] and len(value["note"]) <= 6)


def test_pattern_and_format(tok, vocab):
    g = JSONGrammar(vocab, FORMATTED)
    good = {"day": "2024-02-29", "at": "2024-02-29T13:45:00Z", "id": "123e4567-e89b-12d3-a456-426614174000",
            "code": "AB-123", "note": "is ok"}
    assert _formatted_ok(good)
    for style in range(3):
        b, state = feed(g, tok, _dump(good, style))
        assert b is None and state.finished, style
    for ok_day in ("2000-02-29", "2024-02-29", "0400-02-29", "2023-04-30", "0001-01-01"):
        assert feed(g, tok, json.dumps({**good, "day": ok_day}))[0] is None, ok_day
    for key, bad in [("day", "2024-13-01"), ("day", "24-01-01"), ("day", "2023-02-29"), ("day", "1900-02-29"),
                     ("day", "2023-04-31"), ("day", "0000-01-01"), ("at", "2024-02-29 13:45"),
                     ("id", "123e4567e89b12d3a456426614174000"), ("code", "ab-123"), ("code", "AB-1234"),
                     ("note", "nope"), ("note", "okokokok"), ("note", "o\\nk")]:
        b, state = feed(g, tok, json.dumps({**good, key: bad}))
        assert b is not None or not state.can_end, (key, bad)
    # random paths through the grammar give values of the formats
    rng, done = random.Random(2), 0
    for _ in range(30):
        text = _walk(g, vocab, rng, max_steps=400)
        if text is not None:
            assert _formatted_ok(json.loads(text)), text
            done += 1
    assert done >= 10
    for schema, msg in [({"type": "string", "pattern": "a{3000}"}, "a count over 256"),
                        ({"type": "string", "pattern": "[a-"}, "is not supported"), ({"type": "string", "pattern": 5},
                                                                                    "must be a string")]:
        with pytest.raises(SchemaError, match=msg):
            JSONGrammar(vocab, {"type": "object", "properties": {"s": schema}})


_PATTERNS = [r"^\d{2,4}$", r"ab+c", r"^(cat|dog)s?$", r"^[^0-9]{2,3}$", r"^(?:x|y)*z$", r"^[\w.-]+@x\.io$",
             r"a.c", r"^(ab|a)(bc|c)?$", r"^[a-c]{0,2}[b-d]+$", r"\s"]


@settings(max_examples=300, deadline=None)
@given(pattern=st.sampled_from(_PATTERNS), text=st.text(st.sampled_from("abcdxyz019@.-_ sgot"), max_size=8))
def test_regex_automaton_agrees_with_python(pattern, text):
    import re

    from minichat.regex_fsm import Regex

    assert Regex(pattern).matches(text) == bool(re.search(pattern, text)), (pattern, text)


def _refused(g, tok, texts):
    """Each text is cut off by the grammar, or cannot end where it stops."""
    for bad in texts:
        b, state = feed(g, tok, bad)
        assert b is not None or not state.can_end, bad


def _walks_follow(g, vocab, schema, seed, runs=30, need=10):
    """Random paths through the grammar that finish give values of the schema."""
    rng, done = random.Random(seed), 0
    for _ in range(runs):
        text = _walk(g, vocab, rng, max_steps=300)
        if text is not None:
            jsonschema.validate(json.loads(text), schema)
            done += 1
    assert done >= need


def test_integer_ranges(tok, vocab):
    schema = {"type": "object", "properties": {"pct": {"type": "integer", "minimum": 0, "maximum": 100},
                                               "neg": {"type": "integer", "exclusiveMaximum": 0},
                                               "big": {"type": "integer", "minimum": 1000}},
              "required": ["pct", "neg", "big"], "additionalProperties": False}
    g = JSONGrammar(vocab, schema)
    for pct, neg, big in [(0, -1, 1000), (100, -57, 123456), (42, -1000000, 99999)]:
        for style in range(3):
            b, state = feed(g, tok, _dump({"pct": pct, "neg": neg, "big": big}, style))
            assert b is None and state.finished, (pct, neg, big, style)
    _refused(g, tok, ['{"pct": 101', '{"pct": -1', '{"pct": 007', '{"pct": 5, "neg": 0,', '{"pct": 5, "neg": -0',
                      '{"pct": 5, "neg": 3', '{"pct": 5, "neg": -1, "big": 999}', '{"pct": 1.5'])
    _walks_follow(g, vocab, schema, seed=4)
    with pytest.raises(SchemaError, match="no integer lies"):
        JSONGrammar(vocab, {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 2}}})


@pytest.mark.parametrize("lo,hi", [(0, 100), (-5, 5), (1, None), (None, -3), (17, 2345), (-1000, -999), (0, 0),
                                   (None, None), (7, 7), (-20, 13), (1000, None), (3, 123456)])
def test_integer_range_automaton(lo, hi):
    """integer_range's automaton against Python's integers: every value in -3000..3000 and random ones."""
    from minichat.regex_fsm import Regex, integer_range

    r, rng = Regex(integer_range(lo, hi, 6)), random.Random(0)
    for v in list(range(-3000, 3001)) + [rng.randint(-10**7, 10**7) for _ in range(300)]:
        want = (lo is None or v >= lo) and (hi is None or v <= hi) and len(str(abs(v))) <= 6
        assert r.matches(str(v)) == want, v
    for bad in ("-0", "01", "", "-", "1.0", "+1"):
        assert not r.matches(bad), bad


def test_number_ranges(tok, vocab):
    """A number's minimum / maximum (exclusive too), as pydantic's confloat(ge=0, le=1): each prefix is kept
    while some completion still fits, and the number ends only within its bounds; no exponent under bounds."""
    schema = {"type": "object", "properties": {
        "p": {"type": "number", "minimum": 0, "maximum": 1},
        "t": {"type": "number", "exclusiveMinimum": -3.5, "exclusiveMaximum": 2.5},
        "w": {"type": "number", "minimum": 0.1}},
        "required": ["p", "t", "w"], "additionalProperties": False}
    g = JSONGrammar(vocab, schema)
    for p, t, w in [("0", "0", "0.1"), ("1", "-3.4", "5"), ("0.25", "2.49", "0.10"), ("1.000", "-0", "123.5"),
                    ("0.999", "-3.49999", "0.1000001")]:
        text = '{"p": %s, "t": %s, "w": %s}' % (p, t, w)
        b, state = feed(g, tok, text)
        assert b is None and state.finished, text
        jsonschema.validate(json.loads(text), schema)
    _refused(g, tok, ['{"p": 1.01', '{"p": 2', '{"p": -0.1', '{"p": 1e0', '{"p": 0.5, "t": 2.5,',
                      '{"p": 0.5, "t": -3.5,', '{"p": 0.5, "t": 3', '{"p": 0.5, "t": 1, "w": 0.09}', '{"p": 0.5, "t": 1, "w": 0}', '{"p": 01'])
    _walks_follow(g, vocab, schema, seed=5)
    for bad_schema, msg in [({"type": "number", "minimum": 2, "maximum": 1}, "no number"),
                            ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, "no number"),
                            ({"type": "number", "minimum": "0"}, "finite number")]:
        with pytest.raises(SchemaError, match=msg):
            JSONGrammar(vocab, {"type": "object", "properties": {"x": bad_schema}})


_DECIMAL = st.from_regex(r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,3})?", fullmatch=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lo=st.one_of(st.none(), _DECIMAL), hi=st.one_of(st.none(), _DECIMAL), lo_ex=st.booleans(),
       hi_ex=st.booleans(), num=_DECIMAL)
def test_number_range_agrees_with_python(tok, vocab, lo, hi, lo_ex, hi_ex, num):
    from fractions import Fraction

    x = {"type": "number"}
    if lo is not None:
        x["exclusiveMinimum" if lo_ex else "minimum"] = json.loads(lo)
    if hi is not None:
        x["exclusiveMaximum" if hi_ex else "maximum"] = json.loads(hi)
    v, L, H = Fraction(num), lo and Fraction(lo), hi and Fraction(hi)
    fits_any = (lo is None or hi is None or L < H or (L == H and not lo_ex and not hi_ex))
    if not fits_any:
        with pytest.raises(SchemaError):
            JSONGrammar(vocab, {"type": "object", "properties": {"x": x}})
        return
    inside = ((lo is None or v > L or (v == L and not lo_ex)) and (hi is None or v < H or (v == H and not hi_ex)))
    b, state = feed(JSONGrammar(vocab, {"type": "object", "properties": {"x": x}, "required": ["x"]}), tok,
                    '{"x": %s}' % num)
    assert (b is None and state.finished) == inside, (x, num)
