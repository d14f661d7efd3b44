"""The reasoning task's held-out problems for EleutherAI's lm-evaluation-harness: the YAML
beside this file names `problems` as each subtask's custom_dataset, so the JSONL is read
from here, wherever the harness runs."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def problems(hops, **_):
    """The problems of one hop count, as the harness's test split (the harness passes the
    YAML's metadata too, which this ignores)."""
    import datasets  # installed with lm-eval
    with open(os.path.join(HERE, 'melt_reason.jsonl'), encoding='utf-8') as f:
        rows = [row for row in map(json.loads, f) if row['hops'] == hops]
    return datasets.DatasetDict({'test': datasets.Dataset.from_list(rows)})
