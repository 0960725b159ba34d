"""Reading training data: JSONL, CSV, Parquet, Hugging Face ``datasets`` objects or dirs.

    from deltatune import data
    rows = data.read("train.jsonl", columns={"question": "prompt", "answer": "response"})
    train, val = data.split(rows, validation=0.1, seed=0)     # when no validation file
    rows.where(3)        # "train.jsonl line 5": where row 3 came from (errors use it)
    data.read("wordnet-definitions-demo", split="validation")   # a built-in data set

Every reader returns :class:`Rows`, a list of dicts that remembers its source and the
line of each row, so a task that cannot encode a row names the file and the line. An
empty file, a malformed line (bad JSON, a CSV row with too many fields) or a missing
file is a :class:`DataError` naming the file and the line. Hugging Face ``datasets`` is
optional: ``Dataset`` objects are read by duck typing, saved dataset directories need
the package installed. Nothing here touches a hub.
"""

from deltatune.data.readers import (
    Rows,
    from_dataset,
    mix,
    read,
    read_builtin,
    read_csv,
    read_dataset_dir,
    read_jsonl,
    read_parquet,
    rename_columns,
    split,
)

__all__ = ["Rows", "from_dataset", "mix", "read", "read_builtin", "read_csv", "read_dataset_dir",
           "read_jsonl", "read_parquet", "rename_columns", "split"]
