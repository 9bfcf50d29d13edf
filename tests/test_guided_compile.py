"""Guided compile cost and caches: the json_object pattern stays small (bounded nesting, bounded
whitespace) and admits only JSON objects; the vocabulary is built once; compiled indexes persist on
disk across compilers, corrupt files are dropped; the json_object precompile is a no-op without a
tokenizer. No wall-time assertions: sizes and counters only."""
from __future__ import annotations

import json
import random
import re

import pytest

from dashinfer_core.guided.compiler import (GuidedCompiler, IndexDiskCache, token_bytes_map,
                                            vocabulary_fingerprint)
from dashinfer_core.guided.manager import GuidedManager
from dashinfer_core.guided.spec import JSON_OBJECT_REGEX, build_spec, json_object_regex

# outlines-core's generic object (nesting 3, a space allowed around every token) has ~1600 automaton
# states and took 8 s to compile on a 2-core machine; the depth-2 pattern has 364.
MAX_JSON_OBJECT_STATES = 600


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model_dir)


def byte_vocabulary():
    """One token per byte: an index over it has one state per automaton state, and builds fast."""
    from outlines_core import Vocabulary
    return Vocabulary(0, {bytes([b]): [b + 1] for b in range(256)})


def test_json_object_pattern_is_small():
    from outlines_core import Index
    assert build_spec(json_object=True).regex == JSON_OBJECT_REGEX
    assert len(JSON_OBJECT_REGEX) < 2_000
    states = len(Index(JSON_OBJECT_REGEX, byte_vocabulary()).get_transitions())
    assert states <= MAX_JSON_OBJECT_STATES, states


def _random_value(rng: random.Random, depth: int):
    kinds = ["str", "int", "float", "bool", "null"] + (["obj", "arr"] if depth > 0 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice('ab Z09é€😀"\\/\t\n') for _ in range(rng.randint(0, 6)))
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "obj":
        return {f"k{i}": _random_value(rng, depth - 1) for i in range(rng.randint(0, 3))}
    return [_random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]


def test_json_object_pattern_admits_json_objects_only():
    pattern = re.compile(JSON_OBJECT_REGEX)
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        obj = {f"key {i}": _random_value(rng, 1) for i in range(rng.randint(0, 4))}
        for separators in ((", ", ": "), (",", ":")):
            text = json.dumps(obj, ensure_ascii=False, separators=separators)
            if "\\u" not in text:  # \uXXXX escapes are not offered (the character itself is)
                assert pattern.fullmatch(text), text
                samples.append(text)
    assert len(samples) > 100
    for bad in ['[1]', '"x"', '{"a": 1,}', '{"a" 1}', '{"a": [1,]}', '{"a": tru}', '{"a": 01}', "{'a': 1}",
                '{"a": "\x01"}', '{"a": "\\x"}', '{a: 1}', '{"a": 1}}', '{"a":  1}', '{"a": -}', '{"a": 1.}',
                '{"a": {"b": {"c": 1}}}', '{"a": [[1]]}']:  # the last two: nesting past depth 2
        assert not pattern.fullmatch(bad), bad
    # Mutants of valid objects: whatever the pattern still accepts parses as a JSON object.
    alphabet = '{}[]",: 0-1.eEtruefalsn\\'
    accepted = 0
    for _ in range(3000):
        text = list(rng.choice(samples))
        pos = rng.randrange(len(text) + 1)
        op = rng.randrange(3)
        if op == 0:
            text.insert(pos, rng.choice(alphabet))
        elif text and pos < len(text):
            if op == 1:
                del text[pos]
            else:
                text[pos] = rng.choice(alphabet)
        mutant = "".join(text)
        if pattern.fullmatch(mutant):
            accepted += 1
            assert isinstance(json.loads(mutant), dict), mutant
    assert accepted > 100
    assert json_object_regex(1) != JSON_OBJECT_REGEX and not re.fullmatch(json_object_regex(1), '{"a": {}}')


def test_token_bytes_and_vocabulary_built_once(tokenizer):
    mapping = token_bytes_map(tokenizer, 49152, 2)
    by_id = {i: data for data, ids in mapping.items() for i in ids}
    ids = tokenizer.encode(" the café {\"", add_special_tokens=False)
    assert b"".join(by_id[i] for i in ids) == " the café {\"".encode()
    assert 2 not in by_id and 0 not in by_id  # EOS and special tokens are left out
    compiler = GuidedCompiler(tokenizer, 49152, 2)
    try:
        vocabulary = compiler.vocabulary()
        assert compiler.vocabulary() is vocabulary
        fingerprint = compiler.vocabulary_fingerprint
        assert fingerprint == vocabulary_fingerprint(by_id, 2)
        assert vocabulary_fingerprint(by_id, 0) != fingerprint
        changed = dict(by_id)
        changed[ids[0]] = b"x"
        assert vocabulary_fingerprint(changed, 2) != fingerprint
    finally:
        compiler.shutdown()


SMALL_REGEX = r'\{"answer": "(yes|no|maybe)"\}'


def transitions(index):
    return index.get_initial_state(), index.get_final_states(), index.get_transitions()


def test_disk_cache_round_trip_and_corrupt_files(tokenizer, tmp_path):
    def compiler():
        return GuidedCompiler(tokenizer, 49152, 2, disk_cache=IndexDiskCache(tmp_path), persist_min_seconds=0)

    first = compiler()
    built = first.submit(SMALL_REGEX).result()
    first.shutdown()
    assert (first.num_built, first.num_disk_hits, first.disk_cache.num_stores) == (1, 0, 1)
    path = first.disk_cache.path(first.disk_key(SMALL_REGEX))
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left

    second = compiler()  # a restarted engine: loads, does not build
    loaded = second.submit(SMALL_REGEX).result()
    second.shutdown()
    assert (second.num_built, second.num_disk_hits) == (0, 1)
    assert transitions(loaded) == transitions(built)

    good = path.read_bytes()
    key = first.disk_key(SMALL_REGEX)
    for corrupt in (good[:-7], good[:-200] + bytes(200), b"junk", good[:40] + bytes([good[40] ^ 1]) + good[41:]):
        path.write_bytes(corrupt)
        cache = IndexDiskCache(tmp_path)
        assert cache.load(key) is None and cache.num_corrupt == 1
        assert not path.exists()  # deleted, not tried again
    path.write_bytes(good[:-7])
    third = compiler()  # a corrupt file on start: built again and rewritten
    assert transitions(third.submit(SMALL_REGEX).result()) == transitions(built)
    third.shutdown()
    assert (third.num_built, third.num_disk_hits, third.disk_cache.num_corrupt) == (1, 0, 1)
    assert transitions(IndexDiskCache(tmp_path).load(key)) == transitions(built)


def test_disk_cache_stays_under_its_size_limit(tokenizer, tmp_path):
    cache = IndexDiskCache(tmp_path, max_bytes=1)  # every store prunes everything older than itself
    compiler = GuidedCompiler(tokenizer, 49152, 2, disk_cache=cache, persist_min_seconds=0)
    try:
        for word in ("yes", "no"):
            compiler.submit(f'"{word}"').result()
    finally:
        compiler.shutdown()
    assert cache.num_stores == 2
    assert len(list(tmp_path.glob("*.idx"))) <= 1
    small_files_only = IndexDiskCache(tmp_path / "small", max_file_bytes=10)
    assert not small_files_only.store("big", compiler.submit('"yes"').result())
    assert small_files_only.num_stores == 0 and not (tmp_path / "small").exists()


def test_json_object_precompile(tokenizer, tmp_path):
    assert GuidedManager(None, 49152, 2, timeout=1.0, workers=1).precompile_json_object() is None
    manager = GuidedManager(tokenizer, 49152, 2, timeout=1.0, workers=1, disk_cache_dir=tmp_path)
    try:
        future = manager.precompile_json_object()
        assert manager.compiler.submit(JSON_OBJECT_REGEX) is future  # what a json_object request gets
        assert manager.compiler.num_cache_hits == 1
        index = future.result()
        assert len(index.get_transitions()) <= MAX_JSON_OBJECT_STATES
        assert manager.compiler.num_built == 1
    finally:
        manager.shutdown()
