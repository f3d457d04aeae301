"""`hybridize data check CONFIG_OR_DATA`: read every record of a stage configuration's training data (or of a data
path), build every sample as training would (media decoded), and write a report: counts by reason, the first
rows of each problem, token lengths (with a histogram PNG) and media per sample."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from hybridize.lightning_modules.data.encoding import ChatEncoder, Measured, load_chat_processor
from hybridize.lightning_modules.data.formats import BadSample
from hybridize.lightning_modules.data.records import RecordStore, expand_data_files
from hybridize.lightning_modules.data.sources import DataSource, open_source
from hybridize.lightning_modules.data.stream import encode_row

SHOWN_ROWS = 5
ENCODER_KEYS = ("min_pixels", "max_pixels", "video_fps", "video_max_frames")


def run(args: argparse.Namespace) -> None:
    data, processor = _settings(args)
    encoder = ChatEncoder(load_chat_processor(processor), **{k: data[k] for k in ENCODER_KEYS if k in data})
    max_length = args.max_length or data.get("max_length", 4096)
    report = scan(_rows(data, args.format), encoder, max_length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_lengths(report["token_lengths"], max_length, out / "token_lengths.png")
    print(
        f"{report['usable']} of {report['rows']} rows usable; problems: {report['problems'] or 'none'}; "
        f"report in {out}/report.json and {out}/token_lengths.png"
    )


def _settings(args: argparse.Namespace) -> tuple[dict, str]:
    """The data settings (ChatDataModule arguments) and processor to check with."""
    target = Path(args.target)
    if target.suffix in (".yaml", ".yml") and target.is_file():
        config = yaml.safe_load(target.read_text()) or {}
        data = dict((config.get("data") or {}).get("init_args") or {})
        processor = (
            args.processor
            or data.get("processor")
            or ((config.get("model") or {}).get("init_args") or {}).get("checkpoint")
        )
    else:
        is_json = target.suffix in (".json", ".jsonl")
        data = (
            {"train_files": [args.target]}
            if is_json
            else {"sources": [{"path": args.target, "format": args.format}]}
        )
        processor = args.processor
    if not processor:
        raise ValueError(
            f"No processor to check {args.target} with: pass --processor (a model directory, hub id or name)."
        )
    return data, processor


def _rows(data: dict, layout: str) -> Iterator[tuple[dict, str, object, int]]:
    """(row data, where it is, its source, its shard) of every record of the data section, in file order."""
    for path in expand_data_files(data["train_files"]) if data.get("train_files") else []:
        store = RecordStore([path])
        source = _JsonFile(Path(data.get("media_root") or path.parent))
        for index in range(len(store)):
            try:
                record = json.loads(store.raw(index))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                record = BadSample("invalid_json", str(error))
            yield record, store.source(index), source, 0
    for i, entry in enumerate(data.get("sources") or []):
        # Read the files as they are (a check prepares no cache), unless the configuration reads a prepared one.
        streaming = data.get("streaming", True)
        source = open_source(DataSource.parse(entry, i), streaming, name=f"data.sources[{i}]")
        for shard in range(source.num_shards):
            for row, record in enumerate(source.shard(shard)):
                yield record, source.locate(shard, row), source, shard


class _JsonFile:
    """A JSON / JSONL file as `encode_row` reads a source: records already in the LLaVA or messages layout."""

    layout = "llava"

    def __init__(self, media_root: Path):
        self.media_root = media_root

    def media_root_of(self, shard: int) -> Path:
        return self.media_root


def scan(rows: Iterator, encoder: ChatEncoder, max_length: int) -> dict:
    """Build every row's sample; count problems by reason (first rows of each), token lengths, media per sample."""
    problems, examples, lengths = Counter(), defaultdict(list), []
    media = {"images": Counter(), "videos": Counter()}
    total = 0
    for data, where, source, shard in tqdm(rows, desc="Checking", unit="row"):
        total += 1
        if isinstance(data, BadSample):
            measured = Measured(reason=data.reason, detail=data.detail)
        else:
            measured, _ = encode_row(encoder, source, data, shard, max_length, on_too_long="skip")
        if measured.reason is not None:
            problems[measured.reason] += 1
            if len(examples[measured.reason]) < SHOWN_ROWS:
                examples[measured.reason].append(f"{where}: {measured.detail}")
            if measured.reason != "too_long":
                continue
        lengths.append(measured.full_length)
        media["images"][measured.images] += 1
        media["videos"][measured.videos] += 1
    return {
        "rows": total,
        "usable": total - sum(problems.values()),
        "problems": dict(problems.most_common()),
        "examples": dict(examples),
        "max_length": max_length,
        "token_lengths": lengths,
        "token_length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (0, 50, 90, 99, 100)}
        if lengths
        else {},
        "images_per_sample": {str(k): v for k, v in sorted(media["images"].items())},
        "videos_per_sample": {str(k): v for k, v in sorted(media["videos"].items())},
    }


def plot_lengths(lengths: list[int], max_length: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("The token-length histogram needs matplotlib: pip install matplotlib.") from None
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(lengths, bins=50)
    axis.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    axis.set(xlabel="tokens per sample (untruncated)", ylabel="samples", title="Token lengths")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
