"""Data files as a user would bring them, for tests."""

import json
from pathlib import Path


def addition_jsonl(path: Path, num_rows: int) -> Path:
    """`{"prompt": "aaa+bbb=", "answer": "cccc"}` lines: the tiny model's task as a user's file."""
    with path.open("w") as f:
        for i in range(num_rows):
            a, b = (i * 37) % 1000, (i * 91 + 5) % 1000
            f.write(json.dumps({"prompt": f"{a:03d}+{b:03d}=", "answer": f"{a + b:04d}"}) + "\n")
    return path
