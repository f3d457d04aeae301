"""Chat-format training data for the stages: records -> model batches.

A record (LLaVA / ShareGPT, FineVision or OpenAI-messages layout) becomes HF chat messages (`formats`), is rendered
with the base model's chat template and tokenised in one piece, with labels on the assistant replies and their
end-of-turn token only; images and videos go through the model's processor, videos in Qwen2-VL's layout
(`encoding`, `media_sources`). Two ways in, one `ChatDataModule` (`module`):

- JSON / JSONL files with media paths (`records`, `dataset`): every record is checked before training starts; the
  map-style samples are padded or packed (`collation`, `samplers`).
- Hugging Face data sets through `datasets` (`sources`): parquet / arrow / JSON(L) files, `save_to_disk` folders
  or hub ids, with embedded or referenced media, mixed by weight and streamed (`stream`): shared out between
  ranks and workers, checked lazily, resumable mid-epoch from Lightning checkpoints.

`check` is `hybridize data check`: a full scan of a configuration's data with a report.
"""

from hybridize.lightning_modules.data.collation import collate, pack_rows
from hybridize.lightning_modules.data.dataset import ChatDataset
from hybridize.lightning_modules.data.encoding import (
    IGNORE_INDEX,
    ChatEncoder,
    Measured,
    encode_sample,
    load_chat_processor,
    measure,
    truncation_length,
)
from hybridize.lightning_modules.data.formats import LAYOUTS, BadSample, detect_layout, normalize_record
from hybridize.lightning_modules.data.module import ChatDataModule
from hybridize.lightning_modules.data.records import RecordStore, expand_data_files
from hybridize.lightning_modules.data.samplers import EpochSampler, PackedBatchSampler
from hybridize.lightning_modules.data.sources import DataSource, open_source
from hybridize.lightning_modules.data.stream import STREAM_KEY, ChatStream, StreamLoader, StreamProgress

__all__ = [
    "IGNORE_INDEX",
    "LAYOUTS",
    "STREAM_KEY",
    "BadSample",
    "ChatDataModule",
    "ChatDataset",
    "ChatEncoder",
    "ChatStream",
    "DataSource",
    "EpochSampler",
    "Measured",
    "PackedBatchSampler",
    "RecordStore",
    "StreamLoader",
    "StreamProgress",
    "collate",
    "detect_layout",
    "encode_sample",
    "expand_data_files",
    "load_chat_processor",
    "measure",
    "normalize_record",
    "open_source",
    "pack_rows",
    "truncation_length",
]
