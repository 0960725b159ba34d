"""Data readers: formats, errors naming file and line, column mapping, split, mixing."""

from __future__ import annotations

import gzip
import json

import pytest

from deltatune import data
from deltatune.core.errors import DataError
from deltatune.tasks import CausalLMSFT
from tests.tiny_tokenizer import char_tokenizer


def test_jsonl_keeps_line_numbers_across_blank_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2}\n')
    rows = data.read(f)
    assert rows == [{"a": 1}, {"a": 2}]
    assert rows.where(1) == f"{f} line 3"


@pytest.mark.parametrize("content,message", [
    ("", r"the file is empty \(0 bytes\)"),
    ("\n\n", "no rows"),
    ('{"a": 1}\n{"a": \n', "line 2: not valid JSON"),
    ('{"a": 1}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        data.read(f)
    assert str(f) in str(err.value)


def test_task_errors_point_at_the_source_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    task = CausalLMSFT(char_tokenizer(), chat_template=False)
    with pytest.raises(DataError, match=rf"{f} line 3: missing column 'response'"):
        task.encode_rows(data.read(f))


def test_csv_and_tsv(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt,response\n"a, b",c\n\nd,e\n')
    rows = data.read(f)
    assert rows == [{"prompt": "a, b", "response": "c"}, {"prompt": "d", "response": "e"}]
    assert rows.where(1) == f"{f} line 4"
    t = tmp_path / "d.tsv"
    t.write_text("text\tlabel\nx y\t1\n")
    assert data.read(t) == [{"text": "x y", "label": "1"}]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(DataError, match=r"bad.csv line 3: 3 fields, the header has 2"):
        data.read(bad)


def test_gzipped_jsonl_and_unknown_format(tmp_path):
    f = tmp_path / "d.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"text": "x"}\n'))
    assert data.read(f) == [{"text": "x"}]
    other = tmp_path / "d.xml"
    other.write_text("<a/>")
    with pytest.raises(DataError, match="unknown data format '.xml'"):
        data.read(other)
    with pytest.raises(DataError, match="no such file"):
        data.read(tmp_path / "missing.jsonl")


def test_parquet_roundtrip_or_clear_error(tmp_path):
    f = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        f.write_bytes(b"PAR1 not really")
        with pytest.raises(DataError, match="pip install pyarrow"):
            data.read(f)
        return
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), f)
    rows = data.read(f)
    assert rows == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    assert rows.where(1) == f"{f} record 2"


class FakeDataset:
    """Duck-typed stand-in for datasets.Dataset (the package is optional)."""

    column_names = ("question", "answer")

    def __iter__(self):
        return iter([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])


def test_dataset_objects_and_column_mapping():
    rows = data.read(FakeDataset(), columns={"question": "prompt", "answer": "response"})
    assert rows == [{"prompt": "q1", "response": "a1"}, {"prompt": "q2", "response": "a2"}]
    with pytest.raises(DataError, match="column 'query' .* columns: answer, question"):
        data.read(FakeDataset(), columns={"query": "prompt"})
    with pytest.raises(DataError, match="choose a split .* train, test"):
        data.from_dataset({"train": FakeDataset(), "test": FakeDataset()})
    assert len(data.from_dataset({"train": FakeDataset()}, split="train")) == 2


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    rows = data.Rows([{"i": i} for i in range(20)], "mem")
    train, val = data.split(rows, validation=0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert sorted(r["i"] for r in train + val) == list(range(20))
    again = data.split(rows, validation=0.25, seed=3)
    assert again[1] == val
    assert data.split(rows, validation=0.25, seed=4)[1] != val


def test_mix_ratio():
    task = [{"t": i} for i in range(8)]
    general = [{"g": i} for i in range(3)]
    mixed = data.mix(task, general, 0.2, seed=0)  # 0.2 / 0.8 * 8 = 2 general rows
    assert mixed[:8] == task and len(mixed) == 10
    assert all("g" in r for r in mixed[8:]) and mixed[8] != mixed[9]
    assert len(data.mix(task, general, 0.5)) == 16  # cycles when more are needed
    with pytest.raises(DataError, match=r"mix ratio must be in \[0, 1\)"):
        data.mix(task, general, 1.0)
    json.dumps(mixed)


def test_saved_dataset_directory_needs_datasets_or_a_real_save(tmp_path):
    d = tmp_path / "saved"
    d.mkdir()
    (d / "state.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"needs the 'datasets' package; install it with"):
            data.read(d)
        return
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        data.read(d)
