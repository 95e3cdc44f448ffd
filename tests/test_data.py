"""Loaders: the shared MAMS/SentiHood data, fixture files, bad input, label policy, ids, splits."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from core.data import (
    SPLITS,
    DataError,
    Dataset,
    Instance,
    hash_split,
    load_dataset,
    read_file,
    save_instances,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def mams(data_dir: Path) -> Dataset:
    return load_dataset("mams", data_dir)


@pytest.fixture(scope="module")
def sentihood(data_dir: Path) -> Dataset:
    return load_dataset("sentihood", data_dir)


def sizes(ds: Dataset) -> dict[str, int]:
    return {split: len(ds.splits[split]) for split in SPLITS}


def assert_well_formed(ds: Dataset) -> None:
    ids = [inst.id for inst in ds.all()]
    assert len(ids) == len(set(ids))
    for split in SPLITS:
        assert all(inst.split == split for inst in ds.split(split))
    assert {inst.label for inst in ds.all()} <= set(ds.labels)


# ---------------------------------------------------------------- shared data


def test_mams_counts_and_offsets(mams: Dataset) -> None:
    assert mams.name == "mams"
    assert mams.labels == ("negative", "neutral", "positive")
    assert sizes(mams) == {"train": 11186, "dev": 1332, "test": 1336}
    assert_well_formed(mams)
    assert all(inst.text[inst.start:inst.end] == inst.aspect for inst in mams.all())
    assert not mams.report.skipped
    assert [(f.sentences, f.instances) for f in mams.report.files] == [(4297, 11186), (500, 1332), (500, 1336)]
    first = mams.all()[0]
    assert first == Instance("mams/train/0/0", "train", first.text, "decor", "negative", 4, 9)
    assert mams.split("val") is mams.splits["dev"]
    assert mams.all()[:3] == mams.split("train")[:3] and mams.all()[-1] == mams.split("test")[-1]
    assert mams.by_id()["mams/test/499/0"].split == "test"
    assert "11186 instances from 4297 sentences" in mams.report.summary()


def test_mams_keeps_text_verbatim(mams: Dataset) -> None:
    padded = [inst for inst in mams.all() if inst.text != inst.text.strip()]
    assert padded and all(inst.text[inst.start:inst.end] == inst.aspect for inst in padded)


def test_sentihood_counts(sentihood: Dataset) -> None:
    assert sentihood.labels == ("negative", "positive")
    assert sizes(sentihood) == {"train": 3395, "dev": 838, "test": 1677}
    assert_well_formed(sentihood)
    assert [dict(f.skipped) for f in sentihood.report.files] == [
        {"no opinions": 956, "duplicate opinion": 1}, {"no opinions": 242}, {"no opinions": 488},
    ]
    for inst in sentihood.all():
        assert inst.text == inst.text.strip()
        assert inst.aspect == f"{inst.meta['target']} {inst.meta['category']}".lower()
        assert inst.text[inst.start:inst.end].lower() == inst.meta["target"].lower()
    first = sentihood.by_id()["sentihood/train/1430/0"]
    assert (first.text, first.aspect, first.label, first.start, first.end) == (
        "LOCATION1 is transforming and the prices will go up and up", "location1 price", "negative", 0, 9)


def test_ids_stable_across_loads(data_dir: Path, mams: Dataset, sentihood: Dataset) -> None:
    assert [i.id for i in load_dataset("mams", data_dir).all()] == [i.id for i in mams.all()]
    assert load_dataset("sentihood", data_dir).all() == sentihood.all()


def test_folder_sources(data_dir: Path) -> None:
    ds = load_dataset(str(data_dir / "mams-atsa"))
    assert ds.name == "mams-atsa" and sizes(ds) == {"train": 11186, "dev": 1332, "test": 1336}
    assert ds.all()[0].id == "mams-atsa/train/0/0"
    assert sizes(load_dataset(str(data_dir / "sentihood"))) == {"train": 3395, "dev": 838, "test": 1677}


def test_data_dir_from_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPANLENS_DATA", str(data_dir))
    assert len(load_dataset("sentihood").splits["dev"]) == 838
    monkeypatch.setenv("SPANLENS_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"python -m core fetch-data --dest DIR") as err:
        load_dataset("mams")
    assert str(tmp_path / "mams-atsa" / "train.xml") in str(err.value)


def test_missing_source() -> None:
    with pytest.raises(DataError, match="no such file"):
        load_dataset("no/such/file.jsonl")


# ---------------------------------------------------------------- fixture files


def test_semeval_xml_fixture() -> None:
    ds = load_dataset(str(FIXTURES / "semeval.xml"))
    assert ds.name == "semeval"
    assert [(i.id, i.aspect, i.label) for i in ds.all()] == [
        ("semeval/train/813/0", "appetizers", "positive"),
        ("semeval/train/813/1", "salads", "positive"),
        ("semeval/train/813/2", "steak", "positive"),
        ("semeval/train/1002/1", "service", "negative"),
        ("semeval/train/1002/2", "decor", "neutral"),
    ]
    assert ds.report.skipped == Counter({"conflict": 1, "no aspect terms": 1})
    assert "hash of the text" in ds.report.summary()


def test_sentihood_fixture() -> None:
    ds = load_dataset(str(FIXTURES / "sentihood.json"))
    assert [(i.text, i.aspect, i.label, i.start, i.end) for i in ds.all()] == [
        ("LOCATION1 is cheap but not safe at night", "location1 price", "positive", 0, 9),
        ("LOCATION1 is cheap but not safe at night", "location1 safety", "negative", 0, 9),
        # first mention, matched case-insensitively
        ("I moved from LOCATION2 to location1 last year; LOCATION1 is lovely", "location1 general", "positive", 26, 35),
    ]
    assert ds.report.skipped == Counter({"no opinions": 1, "duplicate opinion": 1})


def test_jsonl_fixture() -> None:
    ds = load_dataset(str(FIXTURES / "reviews.jsonl"))
    assert [(i.id, i.aspect, i.label, i.start, i.end) for i in ds.all()] == [
        ("reviews/train/1", "pasta", "positive", 4, 9),
        ("reviews/train/2", "waiter", "negative", 28, 34),  # offsets found in the text
        ("reviews/train/4", "prices", "neutral", 0, 6),  # case-insensitive search
    ]
    assert ds.report.skipped == Counter({"conflict": 1})


def test_csv_fixture() -> None:
    ds = load_dataset(str(FIXTURES / "reviews.csv"))
    assert sizes(ds) == {"train": 1, "dev": 1, "test": 1}
    assert [(i.id, i.text, i.start, i.end) for i in ds.all()] == [
        ("r1", "The screen, sadly, is dim.", 4, 10),
        ("r2", "Battery life is\nexcellent.", 0, 12),
        ("r3", "Keyboard feels fine.", 0, 8),
    ]
    assert "hash" not in ds.report.summary()


def test_folder_of_user_files(tmp_path: Path) -> None:
    rows = [{"text": f"Review {n} about the soup.", "aspect": "soup", "label": "positive"} for n in range(3)]
    for name, row in zip(["train.jsonl", "val.jsonl", "test.csv"], rows):
        if name.endswith(".csv"):
            (tmp_path / name).write_text(f"text,aspect,label\n{row['text']},soup,positive\n")
        else:
            (tmp_path / name).write_text(json.dumps(row) + "\n")
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_dataset(str(tmp_path))
    assert sizes(ds) == {"train": 1, "dev": 1, "test": 1}
    assert ds.split("test")[0].id == f"{tmp_path.name}/test/2"
    (tmp_path / "dev.csv").write_text("text,aspect,label\nx,x,positive\n")
    with pytest.raises(DataError, match="two files for split 'dev'"):
        load_dataset(str(tmp_path))


# ---------------------------------------------------------------- label policy


def test_conflict_skip_and_error() -> None:
    path = FIXTURES / "semeval.xml"
    assert load_dataset(str(path), conflict="skip").report.skipped["conflict"] == 1
    with pytest.raises(DataError) as err:
        load_dataset(str(path), conflict="error")
    assert "semeval.xml" in str(err.value) and "sentence 1 (id=1002), aspectTerm 0" in str(err.value)
    with pytest.raises(ValueError, match="conflict must be"):
        load_dataset(str(path), conflict="ignore")


def test_label_outside_label_set(tmp_path: Path) -> None:
    ds = load_dataset(str(FIXTURES / "semeval.xml"), labels=("negative", "positive"))
    assert ds.labels == ("negative", "positive")
    assert ds.report.skipped == Counter({"conflict": 1, "label 'neutral' not in label set": 1, "no aspect terms": 1})
    binary = tmp_path / "binary.xml"
    binary.write_text(xml(at(polarity="neutral")))
    with pytest.raises(DataError, match=r"binary\.xml: sentence 1 \(id=s1\), aspectTerm 0: polarity 'neutral'"):
        load_dataset(str(binary), labels=("negative", "positive"), conflict="error")
    custom = tmp_path / "custom.csv"
    custom.write_text("text,aspect,label\nnice soup,soup,pos\nbad soup,soup,positive\n")
    assert load_dataset(str(custom), labels=("neg", "pos")).report.skipped == Counter(
        {"label 'positive' not in label set": 1})


def test_contradictory_sentihood_opinions(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    opinions = [{"sentiment": s, "aspect": "price", "target_entity": "LOCATION1"} for s in ("Positive", "Negative")]
    path.write_text(json.dumps([{"id": 1, "text": "LOCATION1 prices", "opinions": opinions}]))
    ds = load_dataset(str(path))
    assert not ds.all() and ds.report.skipped == Counter({"conflict": 2})
    with pytest.raises(DataError, match=r"s\.json: sentence 0 \(id=1\), opinion 0: contradictory"):
        load_dataset(str(path), conflict="error")


# ---------------------------------------------------------------- bad input

XML_HEAD = '<?xml version="1.0"?>\n<sentences>\n'
XML_OK_SENTENCE = '<sentence id="s0"><text>Good tea.</text><aspectTerms>' \
                  '<aspectTerm term="tea" polarity="positive" from="5" to="8"/></aspectTerms></sentence>\n'


def xml(sentence: str) -> str:
    return XML_HEAD + XML_OK_SENTENCE + sentence + "\n</sentences>\n"


def at(term: str = "tea", polarity: str = "positive", start: str = "5", end: str = "8", text: str = "Good tea.") -> str:
    return (f'<sentence id="s1"><text>{text}</text><aspectTerms><aspectTerm term="{term}" '
            f'polarity="{polarity}" from="{start}" to="{end}"/></aspectTerms></sentence>')


JSONL_OK = '{"text": "Good tea.", "aspect": "tea", "label": "positive"}\n'
CSV_HEAD = "text,aspect,label,from,to,split,id\n"

BAD_INPUTS = [
    # (file name, content, expected fragments of the message)
    ("broken.xml", XML_HEAD + "<sentence><text>x</sentence>\n", ["line 3, column"]),
    ("root.xml", "<reviews/>", ["root element", "<sentences>"]),
    ("noattr.xml", xml('<sentence id="s1"><text>Good tea.</text><aspectTerms><aspectTerm term="tea" '
                       'from="5" to="8"/></aspectTerms></sentence>'), ["sentence 1 (id=s1), aspectTerm 0", "polarity"]),
    ("notext.xml", xml('<sentence><aspectTerms><aspectTerm term="tea" polarity="positive" from="5" to="8"/>'
                       '</aspectTerms></sentence>'), ["sentence 1:", "empty <text>"]),
    ("polarity.xml", xml(at(polarity="great")), ["sentence 1 (id=s1), aspectTerm 0", "unknown polarity 'great'"]),
    ("mismatch.xml", xml(at(start="4", end="7")), ["aspectTerm 0", "give ' te', not the term 'tea'"]),
    ("case.xml", xml(at(term="Tea")), ["aspectTerm 0", "not the term 'Tea'"]),
    ("range.xml", xml(at(start="5", end="20")), ["aspectTerm 0", "out of range"]),
    ("order.xml", xml(at(start="8", end="5")), ["aspectTerm 0", "out of range"]),
    ("nonint.xml", xml(at(start="five")), ["aspectTerm 0", "must be integers"]),
    ("emptyterm.xml", xml(at(term=" ")), ["aspectTerm 0", "empty term"]),
    ("duplicate.xml", xml(at()).replace('id="s1"', 'id="s0"'), ["duplicate id", "sentence 0 (id=s0)", "sentence 1 (id=s0)"]),
    ("broken.jsonl", JSONL_OK + '{"text": "x", "aspect": }\n', ["line 2, column 25", "broken JSON"]),
    ("list.jsonl", JSONL_OK + "[1, 2]\n", ["line 2", "JSON object"]),
    ("nofield.jsonl", JSONL_OK + '\n{"text": "Good tea.", "label": "positive"}\n', ["line 3", "missing field(s) aspect"]),
    ("polarity.jsonl", JSONL_OK + '{"text": "Good tea.", "aspect": "tea", "label": "meh"}\n',
     ["line 2", "unknown polarity 'meh'"]),
    ("emptytext.jsonl", '{"text": "  ", "aspect": "tea", "label": "positive"}\n', ["line 1", "empty or non-string text"]),
    ("emptyaspect.jsonl", '{"text": "Good tea.", "aspect": "", "label": "positive"}\n', ["line 1", "aspect"]),
    ("offsets.jsonl", '{"text": "Good tea.", "aspect": "tea", "label": "positive", "from": 0, "to": 4}\n',
     ["line 1", "give 'Good', not the term 'tea'"]),
    ("range.jsonl", '{"text": "Good tea.", "aspect": "tea", "label": "positive", "from": 5, "to": 99}\n',
     ["line 1", "out of range"]),
    ("half.jsonl", '{"text": "Good tea.", "aspect": "tea", "label": "positive", "from": 5}\n', ["line 1", "both"]),
    ("float.jsonl", '{"text": "Good tea.", "aspect": "tea", "label": "positive", "from": 5.5, "to": 8}\n',
     ["line 1", "integers"]),
    ("split.jsonl", '{"text": "Good tea.", "aspect": "tea", "label": "positive", "split": "holdout"}\n',
     ["line 1", "unknown split 'holdout'"]),
    ("mixed.jsonl", JSONL_OK.replace("}", ', "split": "train"}') + JSONL_OK, ["line 2", "empty split"]),
    ("ids.jsonl", JSONL_OK.replace("}", ', "id": 7}') + "\n" + JSONL_OK.replace("}", ', "id": "7"}'),
     ["duplicate id '7'", "ids.jsonl: line 1", "ids.jsonl: line 3"]),
    ("header.csv", "text,aspect\nGood tea.,tea\n", ["line 1", "missing column(s) label"]),
    ("polarity.csv", CSV_HEAD + "Good tea.,tea,positive,,,train,a\n\"Tea,\nagain\",tea,bad,,,train,b\n",
     ["line 3", "unknown polarity 'bad'"]),
    ("after_multiline.csv", CSV_HEAD + "\"Tea,\nagain\",tea,positive,,,train,a\nGood tea.,tea,positive,0,4,train,b\n",
     ["line 4", "give 'Good'"]),
    ("emptyaspect.csv", CSV_HEAD + "Good tea.,,positive,,,train,a\n", ["line 2", "aspect"]),
    ("nonint.csv", CSV_HEAD + "Good tea.,tea,positive,x,8,train,a\n", ["line 2", "integers"]),
    ("extra.csv", CSV_HEAD + "Good tea.,tea,positive,5,8,train,a,surplus\n", ["line 2", "more fields"]),
    ("ids.csv", CSV_HEAD + "Good tea.,tea,positive,5,8,train,a\nGood tea.,tea,positive,5,8,test,a\n",
     ["duplicate id 'a'", "ids.csv: line 2", "ids.csv: line 3"]),
    ("broken.json", '[{"id": 1, "text": "x",\n "opinions": [}]\n', ["line 2, column 15"]),
    ("object.json", '{"text": "x"}', ["top level", "list"]),
    ("noopinions.json", '[{"id": 4, "text": "LOCATION1"}]', ["sentence 0 (id=4)", "missing field(s) opinions"]),
    ("sentiment.json", '[{"id": 4, "text": "LOCATION1", "opinions": [{"target_entity": "LOCATION1", '
                       '"aspect": "price", "sentiment": "Mixed"}]}]', ["sentence 0 (id=4), opinion 0", "unknown polarity"]),
    ("target.json", '[{"id": 4, "text": "LOCATION1", "opinions": [{"aspect": "price", "sentiment": "Positive"}]}]',
     ["opinion 0", "target_entity"]),
    ("emptytext.json", '[{"id": 4, "text": " ", "opinions": [{"target_entity": "LOCATION1", '
                       '"aspect": "price", "sentiment": "Positive"}]}]', ["sentence 0 (id=4)", "empty text"]),
    ("notes.txt", "hello", ["unsupported file type"]),
]


@pytest.mark.parametrize(("name", "content", "fragments"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_names_file_and_place(tmp_path: Path, name: str, content: str, fragments: list[str]) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    message = str(err.value)
    assert name in message
    for fragment in fragments:
        assert fragment in message, message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "Café", "aspect": "café", "label": "positive"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl: not UTF-8 text \(byte 13\)"):
        load_dataset(str(path))


# ---------------------------------------------------------------- splits and round trips


def test_hash_splits_are_deterministic(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    lines = [json.dumps({"text": f"Review number {n}: the soup was fine.", "aspect": "soup", "label": "neutral"})
             for n in range(500)]
    path.write_text("\n".join(lines) + "\n")
    first, second = load_dataset(str(path)), load_dataset(str(path))
    assert first.all() == second.all()
    counts = sizes(first)
    assert 370 <= counts["train"] <= 430 and 30 <= counts["dev"] <= 70 and 30 <= counts["test"] <= 70
    assert all(inst.split == hash_split(inst.text) for inst in first.all())
    assert all(inst.id == f"many/{inst.split}/{n}" for n, inst in
               sorted(((int(i.id.rsplit("/", 1)[1]), i) for i in first.all()), key=lambda pair: pair[0]))
    assert f"train {counts['train']}, dev {counts['dev']}, test {counts['test']}" in first.report.summary()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_round_trip(tmp_path: Path, mams: Dataset, sentihood: Dataset, suffix: str) -> None:
    originals = mams.split("test") + sentihood.split("dev") + load_dataset(str(FIXTURES / "reviews.csv")).all()
    path = save_instances(originals, tmp_path / f"all{suffix}")
    loaded = load_dataset(str(path))
    assert "hash" not in loaded.report.summary()
    assert sorted(loaded.all(), key=lambda i: i.id) == sorted(originals, key=lambda i: i.id)
    instances, report = read_file(path)
    assert instances == loaded.all() and report.instances == len(originals)


def test_read_file_with_fixed_split() -> None:
    instances, report = read_file(FIXTURES / "semeval.xml", "test", name="rest14")
    assert [i.id for i in instances][:1] == ["rest14/test/813/0"]
    assert report.split == "test" and report.skipped["conflict"] == 1 and not report.notes
