"""tokenizer.py against `tokenizers`, `transformers` and hand-worked examples.

All text is generated here from fixed seeds; nothing is downloaded.
"""

import json
import os
import random
import unicodedata

import pytest
import regex

import tokenizer
from test_cli_data import assert_error, run_cli, snapshot  # the CLI tests' helpers
from tokenizer import GPT2_PATTERN, QWEN2_PATTERN, StreamDecoder, load, train

# -----------------------------------------------------------------------------
# Generated corpus: English, Chinese, code, digits, whitespace, emoji

HANZI = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以"
         "生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想"
         "看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现")
WORDS = ("the model learns to predict next token from data and we train it on a small corpus with "
         "attention layers that read every position before writing Python code fast").split()


def make_corpus(n_lines=3000, seed=0):
    rng = random.Random(seed)

    def english():
        words = rng.choices(WORDS, k=rng.randint(3, 14))
        words[0] = words[0].upper() if rng.random() < 0.1 else words[0].capitalize()
        extra = rng.choice(["", " don't", " I'M sure", " we'll see", " it's", "'S", " you've"])
        return " ".join(words) + extra + rng.choice([".", "!", "?", ",", ""])

    def chinese():
        clauses = ["".join(rng.choices(HANZI, k=rng.randint(2, 12))) for _ in range(rng.randint(1, 3))]
        return "，".join(clauses) + "。"

    def code():
        a, b = rng.sample(WORDS, 2)
        return rng.choice([f"def {a}_{b}(x):\n    return x * {rng.randint(0, 999)}",
                           f"\t{a} = [{b}[i] for i in range({rng.randint(1, 64)})]  # {b}",
                           f"if {a} >= {rng.random():.4f}:\r\n        {b}()",
                           f"{{'{a}': {rng.randint(-9, 9)}}}"])

    def misc():
        return rng.choice([f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                           f"用{rng.choice(WORDS)}写{rng.choice(HANZI)}代码 {rng.randint(0, 10**6)}次",
                           "emoji 😀👍🏽 ok", "café naïve Ünïcödé", "Привет мир",
                           " " * rng.randint(2, 9) + "x",
                           "\n\n" + rng.choice(WORDS) + "   \n", "tabs\t\there"])

    kinds = [english, chinese, code, misc]
    return [rng.choices(kinds, [4, 3, 2, 1])[0]() for _ in range(n_lines)]


CORPUS = make_corpus()
SPECIALS = list(tokenizer.DEFAULT_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def tok():
    return train(CORPUS, vocab_size=1000, default_system='You are "Astra".\nBe brief \\ 简洁 😀')


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


# -----------------------------------------------------------------------------
# Byte mapping, round trip, hand-worked BPE


def test_bytes_to_unicode_is_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    table = tokenizer.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


ROUND_TRIP = ["", " ", "a", "hello world", "  leading and trailing  ", "\t\t\n\n\r\n  \u3000x",
              "😀👍🏽🇨🇳", "你好，世界！这是中文。", "mixed 中文 and English 混合 text123",
              "Привет, мир", "ﬁ ǅ Å Å",
              "\x00\x01\x1b[31mred\x7f", "line1\r\nline2\rline3\n", " " * 50, "<|im_end|> <|endoftext|>",
              "don't I'M WE'LL", "3.14159 1,000,000 2024-01-01", "def f(x):\n\treturn x**2  # 平方"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text


def test_hand_worked_bpe():
    # Wikipedia's example. "aaabdaaabac" is one pre-token; bytes a=97 b=98 c=99 d=100.
    # pairs: aa 4, ab 2, bd 1, da 1, ba 1, ac 1      -> merge (a, a) = 256 "aa"
    #   [256, a, b, d, 256, a, b, a, c]; (256, a) 2 and (a, b) 2 tie, the smaller
    #   pair (97, 98) wins                          -> merge (a, b) = 257 "ab"
    #   [256, 257, d, 256, 257, a, c]; (256, 257) 2 -> merge = 258 "aaab"
    #   [258, d, 258, a, c]
    tok = train(["aaabdaaabac"], vocab_size=256 + 3, special_tokens=[])
    assert tok._merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.encode("aab") == [256, 98]  # (a, a) ranks before (a, b)


def test_merge_helpers():
    assert tokenizer.find_pair([1, 1, 1, 2], (1, 1)) == [0]
    assert tokenizer.merge_pair([1, 1, 1, 1], (1, 1), 9) == [9, 9]
    assert tokenizer.merge_pair([5, 1, 2, 1, 2, 1], (1, 2), 9) == [5, 9, 9, 1]


def tiny_alphabet_corpus(seed):
    # Runs like "aaaa" and "abab" make overlapping and adjacent occurrences of a pair.
    rng = random.Random(seed)
    return ["".join(rng.choice("aab 啊\n") for _ in range(rng.randint(1, 30))) for _ in range(50)]


@pytest.mark.parametrize("lines, vocab_size", [(make_corpus(400, seed=1), 700)] +
                         [(tiny_alphabet_corpus(seed), 320) for seed in range(5)])
def test_incremental_training_matches_full_recount(lines, vocab_size):
    fast = train(lines, vocab_size=vocab_size)
    slow = train(lines, vocab_size=vocab_size, incremental=False)
    assert fast._merges == slow._merges
    assert fast.fingerprint == slow.fingerprint


def test_training_stops_when_nothing_is_left_to_merge():
    tok = train(["ab ab"], vocab_size=1000)
    assert tok.vocab_size == 256 + 2 + 3  # "ab", " ab", then the specials
    assert tok.eos_id == 258


def test_special_token_ids_and_fingerprint(tok):
    assert [tok.eos_id, tok.im_start_id, tok.im_end_id] == [997, 998, 999]
    assert tok.pad_id == tok.eos_id and tok.stop_ids == {997, 999} and tok.vocab_size == 1000
    assert train(CORPUS, vocab_size=1000).fingerprint == tok.fingerprint  # deterministic
    assert train(CORPUS, vocab_size=999).fingerprint != tok.fingerprint


# -----------------------------------------------------------------------------
# Parity with `tokenizers`


def unicode_3_2_lines():
    # Code points assigned in Unicode 3.2 (an old table, so the test does not move
    # with the Python version), in a few contexts; CJK and Hangul are uniform, so
    # every 7th letter of category Lo is enough. `regex` and Oniguruma differ only
    # on characters assigned in much later Unicode versions.
    category = unicodedata.ucd_3_2_0.category
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000
             and category(chr(c)) not in ("Cn", "Co") and (category(chr(c)) != "Lo" or c % 7 == 0)]
    contexts = "".join(f"a{c}b {c}{c} 1'{c}s\n{c}\t " for c in chars)
    return [contexts[i:i + 8000] for i in range(0, len(contexts), 8000)]


def test_pattern_is_qwen2s():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_PATTERN == PRETOKENIZE_REGEX


@pytest.mark.parametrize("pattern", [QWEN2_PATTERN, GPT2_PATTERN], ids=["qwen2", "gpt2"])
def test_pretokenize_matches_tokenizers(pattern):
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    for line in unicode_3_2_lines():
        theirs = [piece for piece, _ in split.pre_tokenize_str(line)]
        assert tokenizer.pretokenize(line, [regex.compile(pattern)]) == theirs


def test_tokenizers_loads_our_file(tok, tok_dir):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert hf.get_vocab_size() == tok.vocab_size
    for line in CORPUS + ROUND_TRIP + ["hi <|im_end|>\n<|im_start|>user"]:
        ids = tok.encode(line, allow_special=True)
        assert hf.encode(line, add_special_tokens=False).ids == ids, line
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids), line


@pytest.mark.parametrize("seed", range(5))
def test_overlapping_merges_match_tokenizers(seed, tmp_path):
    from tokenizers import Tokenizer

    tok = train(tiny_alphabet_corpus(seed), vocab_size=320)
    tok.save(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in tiny_alphabet_corpus(seed + 100):
        assert tok.encode(text) == hf.encode(text).ids, text


def hf_trained(style):
    """A byte-level BPE trained by `tokenizers`, saved to JSON, returned as a dict."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    if style == "gpt2":
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:  # qwen2: NFC + Split + ByteLevel; llama3: digits in threes, ignore_merges
        pattern = QWEN2_PATTERN if style == "qwen2" else QWEN2_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|")
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
        if style == "qwen2":
            hf.normalizer = normalizers.NFC()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer)
    spec = json.loads(hf.to_str())
    spec["model"]["ignore_merges"] = style == "llama3"
    return spec


@pytest.mark.parametrize("style", ["gpt2", "qwen2", "llama3"])
def test_we_load_files_from_tokenizers(style, tmp_path):
    from tokenizers import Tokenizer

    spec = hf_trained(style)
    assert isinstance(spec["model"]["merges"][0], list)  # tokenizers >= 0.20 writes pairs
    as_strings = json.loads(json.dumps(spec))
    as_strings["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    fingerprints = set()
    for name, variant in [("pairs", spec), ("strings", as_strings)]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(variant), encoding="utf-8")
        hf, ours = Tokenizer.from_file(str(path)), load(path)
        fingerprints.add(ours.fingerprint)
        assert ours.vocab_size == hf.get_vocab_size()
        for line in CORPUS + ROUND_TRIP + ["Cafe\u0301 e\u0301 <|im_start|>x"]:
            theirs = hf.encode(line, add_special_tokens=False).ids
            assert ours.encode(line, allow_special=True) == theirs, line
    assert len(fingerprints) == 1  # the merges' spelling is not part of the identity


# -----------------------------------------------------------------------------
# Save / load and special tokens


def test_save_load_round_trip(tok, tok_dir):
    for path in (tok_dir, tok_dir / "tokenizer.json"):
        again = load(path)
        assert again.fingerprint == tok.fingerprint
        assert again.chat.default_system == tok.chat.default_system
        assert [again.encode(s) for s in CORPUS[:200]] == [tok.encode(s) for s in CORPUS[:200]]
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["fingerprint"] == tok.fingerprint


def test_special_tokens_in_user_text_are_plain_text(tok):
    plain = tok.encode("hi <|im_end|>")
    assert tok.im_end_id not in plain and tok.decode(plain) == "hi <|im_end|>"
    assert tok.encode("hi <|im_end|>", allow_special=True) == tok.encode("hi ") + [tok.im_end_id]
    assert tok.decode(tok.encode("a<|endoftext|>b", allow_special=True), skip_special=True) == "ab"


# -----------------------------------------------------------------------------
# Chat template

CHAT = [{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "reply1"},
        {"role": "user", "content": "用中文说 <|im_end|>"},
        {"role": "assistant", "content": "reply2"}]


@pytest.mark.parametrize("messages", [CHAT, [{"role": "system", "content": "Be terse."}] + CHAT[:3]])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tok, tok_dir, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    system = tok.chat.default_system if messages is CHAT else "Be terse."
    assert ours.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token_id == tok.pad_id
    assert hf.encode(ours, add_special_tokens=False) == tok.encode(ours, allow_special=True)


def test_chat_template_without_default_system():
    tok = train(CORPUS[:300], vocab_size=400)
    text = tok.render_chat(CHAT[:1], add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_mask(tok):
    ids, mask = tok.apply_chat_template(CHAT)
    assert len(ids) == len(mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "reply1<|im_end|>reply2<|im_end|>"
    # The user's "<|im_end|>" stays text, so the whole conversation encodes to the
    # same ids as its rendering once that one occurrence is plain text again.
    assert ids.count(tok.im_end_id) == 5  # system + 4 turns
    assert tok.decode(ids) == tok.render_chat(CHAT)
    safe = [dict(m, content=m["content"].replace("<|im_end|>", "")) for m in CHAT]
    assert tok.apply_chat_template(safe)[0] == tok.encode(tok.render_chat(safe), allow_special=True)
    ids, mask = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and not any(mask)


# -----------------------------------------------------------------------------
# Streaming decode


def test_stream_decoder_never_splits_a_character():
    tok = train(["hello world"] * 5 + ["你好"], vocab_size=256 + 3 + 4)  # CJK stays mostly bytes
    text = "流式解码：你好，世界！😀👍🏽 mixed 文字 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # characters really are split over tokens
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(p != "" for p in pieces) < len(ids)  # some tokens were held back


def test_stream_decoder_flushes_truly_invalid_bytes():
    tok = train(["x"], vocab_size=256 + 3)
    stream = StreamDecoder(tok)
    assert stream.feed(0xE4) == "" and stream.feed(0xBD) == ""  # 2 of the 3 bytes of 你
    assert stream.flush() == "\ufffd"
    assert stream.feed(0xFF) == "\ufffd"  # never valid UTF-8: out at once
    assert StreamDecoder(tok, skip_special=True).feed(tok.eos_id) == ""


# -----------------------------------------------------------------------------
# Bad input


def write_json(tmp_path, spec):
    path = tmp_path / "tokenizer.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec), encoding="utf-8")
    return path


def edited(tok, edit):
    spec = tok.to_hf_json()
    edit(spec)
    return spec


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["model"].update(type="WordPiece"), "model type is 'WordPiece', not BPE"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "does not end in ByteLevel"),
    (lambda s: s.update(pre_tokenizer={"type": "Metaspace"}), "does not end in ByteLevel.*SentencePiece"),
    (lambda s: s.update(decoder={"type": "Metaspace"}), "decoder is 'Metaspace'"),
    (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda s: s["model"]["vocab"].pop("Ġ"), "without gaps; 1 ids are missing, first 32"),  # a hole, not a lack
    (lambda s: s["model"]["vocab"].update({"▁hi": 5000}), "not in the GPT-2 byte alphabet"),
    (lambda s: s["model"]["merges"].append(["zz", "q"]), "not in the vocab"),
    (lambda s: s["model"]["merges"].append("a b c"), "neither 'a b' nor"),
    (lambda s: s.pop("model"), "no 'model' object"),
    (lambda s: s["added_tokens"][0].update(id=5000), "without gaps"),
    (lambda s: s.update(version="2.0"), "unknown tokenizer.json version"),
    (lambda s: s["added_tokens"][0].pop("content"), "malformed .KeyError: 'content'"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"].insert(0, "Split"), "malformed .AttributeError"),
])
def test_load_rejects_unsupported_files(tok, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        load(write_json(tmp_path, edited(tok, edit)))


def test_load_rejects_missing_and_corrupt_files(tok, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(write_json(tmp_path, json.dumps(tok.to_hf_json())[:-100]))


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=258 is too small.*at least 259"):
        train(["abc"], vocab_size=258)
    with pytest.raises(ValueError, match="not one string"):
        train("abc", vocab_size=300)
    with pytest.raises(ValueError, match="distinct"):
        train(["abc"], vocab_size=300, special_tokens=["<a>", "<a>"])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "hi"}], "message 0 has role 'robot'; use one of system, user, assistant"),
    ([{"role": "user", "content": ["hi"]}], "message 0 content must be a string, got list"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ("hi", "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
])
def test_chat_rejects_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)
    with pytest.raises(ValueError, match=match):
        tok.render_chat(messages)


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="token id 1000 is out of range for a vocabulary of 1000"):
        tok.decode([1, 1000])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="must be integers"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="out of range"):
        StreamDecoder(tok).feed(10**6)


# -----------------------------------------------------------------------------
# The CLI, run as a user runs it


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS[:200]), encoding="utf-8")
    return path


def train_cmd(**flags):
    return ["tokenizer.py", "train", *(str(x) for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", v))]


@pytest.mark.parametrize("flags, words", [
    ({"input": "missing.txt"}, ["--input", "missing.txt: no such file"]),
    ({"vocab_size": 258}, ["--vocab-size 258 is too small", "at least 259"]),
    ({"out": "afile"}, ["--out", "afile is a file"]),
    ({"out": "adir"}, ["--out", "adir holds files that are not a tokenizer's (notes.txt)"]),
])
def test_train_cli_checks_flags_before_reading(tmp_path, corpus, flags, words):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    args = {"input": corpus, "vocab_size": 300, "out": tmp_path / "tok"}
    args.update({k: tmp_path / v if isinstance(v, str) else v for k, v in flags.items()})
    assert_error(run_cli(*train_cmd(**args)), 2, *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name, content, words", [
    ("corpus.txt", b"hello\n\xff\xfe world\n", ["corpus.txt: line 2", "byte 0xff", "not UTF-8"]),
    ("c.jsonl", b'{"text": "hi"}\n{"txt": "hi"}\n', ["c.jsonl: line 2", 'no "text" field']),
    ("c.jsonl", b'{"text": "hi"}\n\n{"text": \n', ["c.jsonl: line 3", "invalid JSON"]),
    ("corpus.txt", b"\n \n", ["corpus.txt: no text"]),  # would train a tokenizer of bytes alone
])
def test_train_cli_names_the_bad_line_and_writes_nothing(tmp_path, name, content, words):
    (tmp_path / name).write_bytes(content)
    assert_error(run_cli(*train_cmd(input=tmp_path / name, vocab_size=300, out=tmp_path / "tok")), 2, *words)
    assert os.listdir(tmp_path) == [name]


def test_train_cli_replaces_a_tokenizer_only_with_force_and_whole(tmp_path, corpus):
    out, other = tmp_path / "tok", tmp_path / "other.txt"
    other.write_text("\n".join(CORPUS[200:400]), encoding="utf-8")
    assert run_cli(*train_cmd(input=corpus, vocab_size=300, out=out)).returncode == 0
    old = snapshot(out)
    # data prepared with the old tokenizer would no longer open: replacing it takes --force
    assert_error(run_cli(*train_cmd(input=other, vocab_size=300, out=out)), 2, "--out", "--force")
    force = train_cmd(input=other, vocab_size=300, out=out) + ["--force"]
    assert_error(run_cli(*force, full_disk_at=1000), 1, str(out), "File too large")
    assert snapshot(out) == old and sorted(os.listdir(tmp_path)) == ["corpus.txt", "other.txt", "tok"]
    r = run_cli(*force)
    assert r.returncode == 0, r.stderr
    assert load(out).fingerprint != json.loads(old["tokenizer_config.json"])["fingerprint"]
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "other.txt", "tok"]  # no temporary directory left


@pytest.mark.parametrize("spec, words", [(None, "no tokenizer.json"),
                                         ('{"model": ', "tokenizer.json is not valid JSON")])
def test_encode_cli_names_a_tokenizer_that_is_not_one(tmp_path, spec, words):
    if spec is not None:
        (tmp_path / "tokenizer.json").write_text(spec)
    assert_error(run_cli("tokenizer.py", "encode", "--tokenizer", tmp_path, "hi"), 2, "--tokenizer", words)
