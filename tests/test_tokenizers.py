"""dalle_data.formats.tokenizers against DALLE-pytorch's own tokenizer classes, and train-tokenizer.

Parity is the whole point: shards store token ids once, so they must be exactly what
DALLE-pytorch's ``SimpleTokenizer`` / ``HugTokenizer`` / ``YttmTokenizer`` compute.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import ftfy
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dalle_data.cli import app
from dalle_data.compat import import_dalle_pytorch
from dalle_data.formats import tokenizers
from dalle_data.pipeline import train_tokenizer

import_dalle_pytorch()
from dalle_pytorch import tokenizer as dt  # noqa: E402  (after the compat shim)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Everything real captions throw at a tokenizer.
HOSTILE = [
    "",
    " ",
    "\t\r\n",
    "A red circle on a white background",
    "Tom &amp; Jerry",
    "Tom &amp;amp; Jerry &amp;amp;amp; friends",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39; &#x263A; &nbsp;x",
    "AT&T R&D &notanentity; & alone &",
    "<b>html</b> &amp; tags",
    "cafÃ© naÃ¯ve â€œmojibakeâ€\x9d Ã©tÃ©",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "emoji 🙂🎉👩‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "東京タワーの夜景 北京 서울 ภาษาไทย",
    "accents: café naïve résumé Ångström Zürich São Paulo",
    "combining: cafe\u0301 n\u0303",
    "control\x00chars\x01\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f\x85\x9f end",
    "line\r\nbreaks\rand\nmore\u2028sep\u2029para",
    "zero\u200bwidth\u200c\u200djoiners\u2060 and nbsp\u00a0here",
    "\ufeffBOM at start and \ufeff inside",
    "ligatures: ﬁne ﬂow ﬀ ﬃ ĳ",
    "curly ‘single’ “double” „low” «guillemets»",
    "dashes – — ‒ ― and minus −",
    "fullwidth ＡＢＣ ｄｅｆ １２３ ！？",
    "URL https://example.com/a_b-c?d=1&e=%20#frag www.test.org/x.jpg",
    "numbers 3.14159 1,000,000 12:30pm 2021-05-04 #42 $99.99 50%",
    "UPPER CASE SHOUTING and MiXeD cAsE",
    "İstanbul ΑΣ ΣΊΣΥΦΟΣ ß ẞ ǅ",
    "it's they're we've I'm you'll he'd IT'S it'ſ",
    "<|startoftext|> a <|endoftext|> !<|endoftext|> x<|endoftext|>y <|ENDOFTEXT|>",
    "tabs\tand   many     spaces   ",
    "   leading and trailing   ",
    "surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "Ω ≈ ç √ ∫ ˜ µ ≤ ≥ ÷ ♥ ☃ ★",
    " ".join(f"word{i % 37} Wort{i % 11}," for i in range(150)),  # 300 words
]

ASCII_SAFE = "\t\n\r" + "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")


@pytest.fixture(scope="module")
def simple() -> tokenizers.Tokenizer:
    return tokenizers.load("simple")


@pytest.fixture(scope="module")
def reference() -> dt.SimpleTokenizer:
    return dt.SimpleTokenizer()


def as_lists(arrays: list[np.ndarray]) -> list[list[int]]:
    for a in arrays:
        assert a.ndim == 1 and a.dtype == tokenizers.ID_DTYPE
    return [a.tolist() for a in arrays]


# --- simple -----------------------------------------------------------------------------


def test_simple_matches_dalle_pytorch_on_hostile_corpus(simple, reference):
    expected = [reference.encode(text) for text in HOSTILE]
    assert as_lists(simple.encode_batch(HOSTILE)) == expected
    # One at a time, and in reverse order: the chunk cache must not change any result.
    assert [simple.encode_batch([t])[0].tolist() for t in HOSTILE] == expected
    assert as_lists(simple.encode_batch(HOSTILE[::-1])) == expected[::-1]
    assert len(expected[-1]) > 300 and expected[0] == []


def test_simple_matches_after_cache_resets_and_in_slices(reference):
    tokenizer = tokenizers.load("simple")
    tokenizer.max_cached_chunks = 3
    tokenizer.slice_size = 4  # a batch in several steps, the cache reset between some
    expected = [reference.encode(text) for text in HOSTILE]
    for _ in range(2):
        assert as_lists(tokenizer.encode_batch(HOSTILE)) == expected
    assert tokenizer.encode_batch([]) == []


def test_simple_empty_caption_is_what_tokenize_pads(simple, reference):
    (ids,) = simple.encode_batch([""])
    assert ids.size == 0
    assert reference.tokenize([""], 8).tolist() == [[0] * 8]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=60), max_size=8))
def test_simple_matches_on_random_unicode(simple, reference, texts):
    assert as_lists(simple.encode_batch(texts)) == [reference.encode(t) for t in texts]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=ASCII_SAFE + "&é€\u00a0\x0b\x1c", max_size=60), max_size=8))
def test_simple_matches_on_ascii_heavy_text(simple, reference, texts):
    """Text that mostly takes the ASCII fast path, with a few characters that must not."""
    assert as_lists(simple.encode_batch(texts)) == [reference.encode(t) for t in texts]


def test_ascii_fast_path_skips_only_what_ftfy_and_unescape_leave_alone():
    """The fast path assumes ftfy + double html.unescape change nothing in its alphabet but
    whitespace; check every character and every pair of characters exhaustively."""
    assert all(tokenizers._ASCII_SAFE.fullmatch(c) for c in ASCII_SAFE)
    assert not any(
        tokenizers._ASCII_SAFE.fullmatch(chr(c)) for c in range(0x300) if chr(c) not in ASCII_SAFE
    )
    for a in ASCII_SAFE:
        for b in ASCII_SAFE:
            text = f"{a}{b}x{a}"
            cleaned = dt.whitespace_clean(dt.basic_clean(text))
            assert cleaned == " ".join(text.split()), repr(text)
    assert ftfy.fix_text("a\r\nb\rc") == "a\nb\nc"  # only whitespace changes


def test_ftfy_skip_covers_every_code_point_ftfys_fixers_change():
    """_basic_clean skips ftfy for text without FTFY_TOUCHES characters (plus NFC and no
    mojibake): every other code point must pass each of ftfy's other fixers unchanged."""
    from ftfy import fixes

    kept = "".join(chr(c) for c in range(0x110000) if not tokenizers.FTFY_TOUCHES.match(chr(c)))
    assert "\ud800" not in kept and "&" not in kept and "\u02bc" not in kept
    for fixer in (
        fixes.unescape_html,
        fixes.fix_c1_controls,
        fixes.fix_latin_ligatures,
        fixes.fix_character_width,
        fixes.uncurl_quotes,
        fixes.fix_line_breaks,
        fixes.fix_surrogates,
        fixes.remove_terminal_escapes,
        fixes.remove_control_chars,
    ):
        assert fixer(kept) == kept, fixer.__name__


@pytest.mark.parametrize(
    "text",
    [
        "plain café, naïve résumé 東京 🙂 — ok",  # skips ftfy
        "x\nÃ y",  # a line that only looks like mojibake on its own: ftfy
        "1\nÃ y",
        "e\u0301 not NFC",
        "modifier \u02bcapostrophe",
        "sÃ³ mojibake",
        "œ\nx",
    ],
)
def test_simple_clean_up_with_and_without_ftfy(reference, text):
    assert tokenizers._basic_clean(text) == dt.basic_clean(text)
    assert tokenizers.load("simple").encode_batch([text])[0].tolist() == reference.encode(text)


def test_simple_vocabulary_and_clean_up_are_the_references(reference):
    """The simple tokenizer rebuilds DALLE-pytorch's vocabulary, word regex and clean-up
    without importing dalle_pytorch; they must be the reference's own."""
    encoder, merges = tokenizers._clip_vocab(Path(dt.default_bpe()).read_text(encoding="utf-8"))
    assert encoder == reference.encoder
    assert merges == sorted(reference.bpe_ranks, key=reference.bpe_ranks.__getitem__)
    assert reference.vocab_size == tokenizers._CLIP_VOCAB_SIZE
    assert tokenizers._CLIP_SPLIT.pattern == reference.pat.pattern
    assert tokenizers._CLIP_SPLIT.flags == reference.pat.flags
    assert tokenizers._clip_bpe_path() == Path(dt.default_bpe())
    for text in HOSTILE:
        assert tokenizers._basic_clean(text) == dt.basic_clean(text), repr(text)
        assert tokenizers._whitespace_clean(text) == dt.whitespace_clean(text), repr(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_simple_clean_up_matches_the_reference_on_random_unicode(text):
    assert tokenizers._basic_clean(text) == dt.basic_clean(text)
    assert tokenizers._whitespace_clean(text) == dt.whitespace_clean(text)


def test_simple_tokenizer_does_not_import_torch():
    """Every process that writes or verifies shards loads it: torch would add seconds."""
    code = (
        "import sys; from dalle_data.formats import tokenizers;"
        " ids = tokenizers.load('simple').encode_batch(['a cat'])[0].tolist();"
        " heavy = ('torch', 'dalle_pytorch', 'transformers');"
        " print(ids, sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "[320, 2368] []"


def test_simple_record_is_stable_and_path_free(simple):
    record = simple.record()
    assert record == {
        "kind": "simple",
        "vocab_size": 49408,
        # sha256 of b"simple\0" + dalle-pytorch 1.6.6's bpe_simple_vocab_16e6.txt
        "fingerprint": "60b20c2a70b92b3e1920bf14b27fa781bf71dc2505fa291c9c4726f3067c88b5",
        "spec": "simple",
    }


# --- hug and yttm ---------------------------------------------------------------------------


def write_captions(path: Path, captions: list[str]) -> Path:
    path.write_text("".join(c.replace("\n", " ").replace("\r", " ") + "\n" for c in captions))
    return path


CAPTIONS = [
    f"a {colour} {shape} on a {back} background"
    for colour in ("red", "green", "blue", "yellow", "purple")
    for shape in ("circle", "square", "triangle")
    for back in ("white", "black")
] + [h for h in HOSTILE if h.strip()]


@pytest.fixture(scope="module")
def hug_json(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hug")
    source = write_captions(folder / "captions.txt", CAPTIONS)
    output = folder / "tokenizer.json"
    record = train_tokenizer.train_bpe(source, 400, output)
    assert record["captions"] == len(CAPTIONS)
    return output


def test_trained_bpe_matches_dalle_pytorch_hugtokenizer(hug_json):
    reference = dt.HugTokenizer(str(hug_json))
    ours = tokenizers.load(f"hug:{hug_json}")
    assert ours.vocab_size == reference.vocab_size == 400
    assert as_lists(ours.encode_batch(HOSTILE)) == [reference.encode(t) for t in HOSTILE]
    # id 0 is DALLE-pytorch's padding: no text may produce it.
    assert all(0 not in ids for ids in as_lists(ours.encode_batch(HOSTILE)))
    assert ours.record()["spec"] == f"hug:{hug_json}"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=6))
def test_hug_matches_on_random_unicode(hug_json, texts):
    reference = dt.HugTokenizer(str(hug_json))
    ours = tokenizers.load(f"hug:{hug_json}")
    assert as_lists(ours.encode_batch(texts)) == [reference.encode(t) for t in texts]


def test_hug_fingerprint_ignores_path_formatting_and_merges_format(hug_json, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(json.loads(hug_json.read_text())))  # compact, same content
    assert (
        tokenizers.load(f"hug:{moved}").fingerprint
        == tokenizers.load(f"hug:{hug_json}").fingerprint
    )
    legacy = json.loads(hug_json.read_text())  # merges as "a b" strings, as before 0.20
    legacy["model"]["merges"] = [" ".join(pair) for pair in legacy["model"]["merges"]]
    moved.write_text(json.dumps(legacy))
    assert as_lists(tokenizers.load(f"hug:{moved}").encode_batch(HOSTILE)) == as_lists(
        tokenizers.load(f"hug:{hug_json}").encode_batch(HOSTILE)
    )
    assert (
        tokenizers.load(f"hug:{moved}").fingerprint
        == tokenizers.load(f"hug:{hug_json}").fingerprint
    )
    changed = json.loads(hug_json.read_text())
    changed["model"]["vocab"]["zzz"] = len(changed["model"]["vocab"])
    moved.write_text(json.dumps(changed))
    assert (
        tokenizers.load(f"hug:{moved}").fingerprint
        != tokenizers.load(f"hug:{hug_json}").fingerprint
    )


def test_hug_keeps_a_word_level_tokenizer_exact(tmp_path):
    """Not only our own BPEs: any tokenizer.json, e.g. one with a post-processor that adds
    special tokens (HugTokenizer replaces it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    hf = Tokenizer(models.WordLevel({"[PAD]": 0, "[CLS]": 1, "a": 2, "red": 3}, unk_token="[PAD]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", 1)]
    )
    path = tmp_path / "wordlevel.json"
    hf.save(str(path))
    texts = ["a red thing", "", "red red"]
    reference = dt.HugTokenizer(str(path))
    assert as_lists(tokenizers.load(f"hug:{path}").encode_batch(texts)) == [
        reference.encode(t) for t in texts
    ]


def test_yttm_matches_dalle_pytorch(tmp_path):
    import youtokentome as yttm

    source = write_captions(tmp_path / "captions.txt", CAPTIONS * 3)
    model = tmp_path / "yttm.model"
    yttm.BPE.train(data=str(source), vocab_size=400, model=str(model), n_threads=1)
    reference = dt.YttmTokenizer(str(model))
    ours = tokenizers.load(f"yttm:{model}")
    assert ours.vocab_size == reference.vocab_size == 400
    assert as_lists(ours.encode_batch(HOSTILE)) == [t.tolist() for t in reference.encode(HOSTILE)]
    assert ours.encode_batch([]) == []
    assert ours.record()["kind"] == "yttm" and len(ours.fingerprint) == 64


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("clip", "tokenizer spec 'clip' is not understood"),
        ("hug:", "is not understood"),
        ("bpe:x.json", "is not understood"),
        ("hug:/no/such/tokenizer.json", "tokenizer file /no/such/tokenizer.json"),
        ("yttm:/no/such.model", "does not exist"),
    ],
)
def test_bad_specs_are_refused_clearly(spec, message):
    with pytest.raises(tokenizers.TokenizerError, match=message.replace("?", r"\?")):
        tokenizers.load(spec)


def test_bad_tokenizer_files_are_refused_clearly(tmp_path, hug_json):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(tokenizers.TokenizerError, match="is not a Hugging Face tokenizer.json"):
        tokenizers.load(f"hug:{broken}")
    truncating = json.loads(hug_json.read_text())
    truncating["truncation"] = {
        "direction": "Right",
        "max_length": 4,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    path = tmp_path / "truncating.json"
    path.write_text(json.dumps(truncating))
    with pytest.raises(tokenizers.TokenizerError, match="enables truncation"):
        tokenizers.load(f"hug:{path}")
    # youtokentome loads these without complaint, then aborts the process when encoding.
    import youtokentome as yttm

    source = write_captions(tmp_path / "captions.txt", CAPTIONS * 3)
    model = tmp_path / "yttm.model"
    yttm.BPE.train(data=str(source), vocab_size=300, model=str(model), n_threads=1)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(model.read_bytes()[:-40])
    binary = tmp_path / "binary.model"
    binary.write_bytes(b"\x00\xff" * 10)
    for bad in (broken, truncated, binary):
        with pytest.raises(tokenizers.TokenizerError, match="is not a YouTokenToMe model"):
            tokenizers.load(f"yttm:{bad}")


def test_non_text_captions_are_refused_clearly(simple, hug_json, tmp_path):
    import youtokentome as yttm

    source = write_captions(tmp_path / "captions.txt", CAPTIONS * 3)
    model = tmp_path / "yttm.model"
    yttm.BPE.train(data=str(source), vocab_size=300, model=str(model), n_threads=1)
    for tokenizer in (simple, tokenizers.load(f"hug:{hug_json}"), tokenizers.load(f"yttm:{model}")):
        for bad in (None, b"bytes", 7):
            with pytest.raises(tokenizers.TokenizerError, match="caption 1 of the batch is"):
                tokenizer.encode_batch(["fine", bad])


# --- train-tokenizer -------------------------------------------------------------------------


def write_shards(folder: Path, captions: list[str]) -> Path:
    folder.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(folder / f"ds-{shard:05d}.tar", "w") as tar:
            for i, caption in enumerate(captions[shard::2]):
                for suffix, data in ((".jpg", b"\xff\xd8"), (".txt", caption.encode())):
                    info = tarfile.TarInfo(f"{shard}{i:011d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dalle-data"), "train-tokenizer", *args],
        capture_output=True,
        text=True,
    )


def test_train_tokenizer_is_deterministic_across_processes(tmp_path):
    source = write_captions(tmp_path / "captions.txt", CAPTIONS)
    outputs = [tmp_path / "a.json", tmp_path / "b.json"]
    for output in outputs:
        done = train_cli(str(source), "--vocab-size", "300", "-o", str(output))
        assert done.returncode == 0, done.stderr
        assert f"trained 300 tokens on {len(CAPTIONS)} captions" in done.stdout
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_train_tokenizer_reads_parquet_and_shards_alike(tmp_path):
    text = write_captions(tmp_path / "captions.txt", CAPTIONS)
    parquet = tmp_path / "filtered.parquet"
    pq.write_table(
        pa.table({"row_id": list(range(len(CAPTIONS) + 1)), "caption": [*CAPTIONS, None]}), parquet
    )
    # Shards hold the captions in another order: BPE training only counts words.
    shards = write_shards(tmp_path / "shards", CAPTIONS)
    outputs = {}
    for name, source in (("text", text), ("parquet", parquet), ("shards", shards)):
        outputs[name] = tmp_path / f"{name}.json"
        result = CliRunner().invoke(
            app, ["train-tokenizer", str(source), "--vocab-size", "300", "-o", str(outputs[name])]
        )
        assert result.exit_code == 0, result.output
        assert f"on {len(CAPTIONS)} captions" in result.output
    assert outputs["parquet"].read_bytes() == outputs["text"].read_bytes()
    assert outputs["shards"].read_bytes() == outputs["text"].read_bytes()


def not_utf8(folder: Path) -> Path:
    (folder / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    return folder / "bad.txt"


def no_shards(folder: Path) -> Path:
    (folder / "shards").mkdir()
    return folder / "shards"


def no_caption_column(folder: Path) -> Path:
    pq.write_table(pa.table({"text": ["a"]}), folder / "f.parquet")
    return folder / "f.parquet"


@pytest.mark.parametrize(
    ("make", "vocab", "message"),
    [
        (lambda p: write_captions(p / "c.txt", CAPTIONS), "100", "--vocab-size 100 is too small"),
        (lambda p: p / "missing.txt", "300", "does not exist"),
        (lambda p: write_captions(p / "empty.txt", []), "300", "holds no captions"),
        (not_utf8, "300", "line 2 is not UTF-8"),
        (no_shards, "300", r"holds no \*\.tar shards"),
        (no_caption_column, "300", "has no `caption` column"),
    ],
)
def test_train_tokenizer_bad_input_fails_with_one_clear_line(tmp_path, make, vocab, message):
    source = make(tmp_path)
    output = tmp_path / "out" / "tokenizer.json"
    result = CliRunner().invoke(
        app, ["train-tokenizer", str(source), "--vocab-size", vocab, "-o", str(output)]
    )
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert re.search(message, result.output), result.output
    assert not output.exists()


# --- the Snakemake rule ----------------------------------------------------------------------


def test_tokenizer_rule_trains_the_sample_tokenizer(tmp_path):
    (tmp_path / "Snakefile").write_text(
        f'configfile: "{REPO}/configs/config.yaml"\n\n\n'
        f'include: "{REPO}/pipelines/common.smk"\n'
        f'include: "{REPO}/pipelines/tokenizer.smk"\n'
    )
    (tmp_path / "extra.yaml").write_text("datasets:\n  sample:\n    tokenizer_vocab_size: 300\n")
    metadata = tmp_path / "data" / "sample" / "metadata"
    metadata.mkdir(parents=True)
    pq.write_table(
        pa.table({"row_id": list(range(len(CAPTIONS))), "caption": CAPTIONS}),
        metadata / "filtered.parquet",
    )
    target = "data/sample/tokenizer/tokenizer.json"
    done = subprocess.run(
        [str(BIN / "snakemake"), target, "--cores", "1", "--configfile", "extra.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert tokenizers.load(f"hug:{tmp_path / target}").vocab_size == 300
    assert (tmp_path / "data/sample/logs/tokenizer.log").read_text().startswith("trained 300")
    assert (tmp_path / "data/sample/benchmarks/tokenizer.tsv").exists()
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
