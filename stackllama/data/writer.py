"""Writing the prepared datasets: parquet shards with a fixed schema, and the dataset card."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ANSWER_TYPE = pa.struct(
    [
        ("answer_id", pa.int64()),
        ("author", pa.string()),
        ("author_id", pa.int64()),
        ("author_profile", pa.string()),
        ("pm_score", pa.int64()),
        ("selected", pa.bool_()),
        ("text", pa.string()),
        ("score", pa.int64()),
    ]
)
PREFERENCE_SCHEMA = pa.schema(
    [
        ("qid", pa.int64()),
        ("question", pa.string()),
        ("answers", pa.list_(ANSWER_TYPE)),
        ("date", pa.string()),
        ("metadata", pa.list_(pa.string())),
        ("tags", pa.list_(pa.string())),
    ]
)
PAIR_SCHEMA = pa.schema(
    [
        ("qid", pa.int64()),
        ("question", pa.string()),
        ("date", pa.string()),
        ("metadata", pa.list_(pa.string())),
        ("response_j", pa.string()),
        ("response_k", pa.string()),
        # not in the published layout: lets the reward stage report accuracy by score gap
        ("pm_score_j", pa.int64()),
        ("pm_score_k", pa.int64()),
    ]
)


class ShardedParquetWriter:
    """Appends rows to `directory/data-00000.parquet`, `data-00001.parquet`, ...

    Rows are buffered and flushed as row groups of `row_group_rows`, and a new file is
    started every `max_rows_per_file` rows, so memory stays bounded and shards stay a
    size the Hub and `datasets` handle well. A directory that received no row still gets
    one empty file with the schema, so every subset loads.
    """

    def __init__(self, directory: Path, schema: pa.Schema, max_rows_per_file: int = 100_000,
                 row_group_rows: int = 500):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.max_rows_per_file = max_rows_per_file
        self.row_group_rows = min(row_group_rows, max_rows_per_file)
        self.rows_written = 0
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._files = 0

    def write(self, row: dict) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.row_group_rows or self._rows_in_file + len(self._buffer) >= self.max_rows_per_file:
            self._flush()

    def _open(self) -> None:
        path = self.directory / f"data-{self._files:05d}.parquet"
        self._writer = pq.ParquetWriter(path, self.schema)
        self._files += 1
        self._rows_in_file = 0

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._open()
        self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
        self._rows_in_file += len(self._buffer)
        self.rows_written += len(self._buffer)
        self._buffer = []
        if self._rows_in_file >= self.max_rows_per_file:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._files == 0:
            pq.write_table(self.schema.empty_table(), self.directory / "data-00000.parquet")


def cc_by_sa_versions(first_date: str, last_date: str) -> list[str]:
    """CC BY-SA versions that cover posts created between two ISO dates (Stack Exchange's terms)."""
    versions = []
    if first_date and first_date < "2011-04-08":
        versions.append("cc-by-sa-2.5")
    if first_date < "2018-05-02" and last_date >= "2011-04-08":
        versions.append("cc-by-sa-3.0")
    if last_date >= "2018-05-02":
        versions.append("cc-by-sa-4.0")
    return versions or ["cc-by-sa-4.0"]


def dataset_card(summary: dict, subsets: tuple[str, ...]) -> str:
    """README.md for the output folder: `configs:` so `load_dataset(folder, "pairs", split=...)`
    works, the license and attribution the content requires, and the preparation summary."""
    licenses = cc_by_sa_versions(summary["first_post_date"], summary["last_post_date"])
    lines = ["---", "license:"] + [f"- {v}" for v in licenses] + ["configs:", "- config_name: pairs", "  default: true",
                                                                  "  data_files:"]
    for subset in subsets:
        lines += [f"  - split: {subset}", f"    path: pairs/{subset}/*.parquet"]
    lines += ["- config_name: preferences", "  data_files:", "  - split: train", "    path: preferences/*.parquet",
              "---", ""]
    sites = ", ".join(summary["sites"])
    lines += [
        "# Stack Exchange preference data (StackLLaMA layout)",
        "",
        f"Made by `scripts/prepare_data.py` of stackllama from the data dumps of {sites}.",
        "",
        "- `preferences`: one row per question with at least two answers; every answer with its",
        "  `pm_score` (-1 if the score is negative, else round(log2(1 + score)), +1 if accepted).",
        "- `pairs`: up to "
        f"{summary['max_pairs_per_question']} answer pairs per question (`response_j` preferred over `response_k`,",
        "  their scores in `pm_score_j` / `pm_score_k`),",
        "  split by question into " + ", ".join(f"`{s}`" for s in subsets) + ".",
        "",
        "```python",
        "from datasets import load_dataset",
        'pairs = load_dataset("path/to/this/folder", "pairs", split="finetune")',
        'preferences = load_dataset("path/to/this/folder", "preferences", split="train")',
        "```",
        "",
        "## License and attribution",
        "",
        "Stack Exchange user contributions are licensed under CC BY-SA ("
        + ", ".join(v.removeprefix("cc-by-sa-") for v in licenses)
        + " by the date of the content), and so is this derived dataset. Attribution: the",
        f"authors of the posts on {sites} (named with their profile URL in `answers.author` /",
        "`answers.author_profile` and in `metadata`) and Stack Exchange, Inc.",
        "",
        "## Preparation summary",
        "",
        "```",
        format_summary(summary),
        "```",
        "",
    ]
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The end-of-run summary as aligned text (printed and written into the card)."""
    lines = [f"sites: {', '.join(summary['sites'])}",
             f"rows read: {summary['rows_read']:,}",
             f"questions: {summary['questions']:,}  answers: {summary['answers']:,}",
             f"questions with >= 2 answers: {summary['questions_with_2_answers']:,}",
             f"questions in preferences: {summary['preference_rows']:,}",
             f"{'subset':<12}{'questions':>12}{'pairs':>12}"]
    for subset, counts in summary["subsets"].items():
        lines.append(f"{subset:<12}{counts['questions']:>12,}{counts['pairs']:>12,}")
    lines.append(f"{'total':<12}{sum(c['questions'] for c in summary['subsets'].values()):>12,}"
                 f"{summary['pairs']:>12,}")
    if summary["skipped"]:
        lines.append("skipped:")
        width = max(len(k) for k in summary["skipped"])
        for reason, n in sorted(summary["skipped"].items()):
            lines.append(f"  {reason:<{width}}  {n:,}")
    return "\n".join(lines)
