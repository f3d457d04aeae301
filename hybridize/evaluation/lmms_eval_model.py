"""lmms-eval model `hybridize`: any lmms-eval benchmark (MMBench, DocVQA, ChartQA, Video-MME, ...) on a hybrid.

Registered through lmms-eval's plugin entry point (`pyproject.toml`: group `lmms_eval.models`, name
`hybridize`, value `hybridize.evaluation.lmms_eval_plugin:manifest`; installed with the `eval` extra):

    lmms-eval --model hybridize --model_args pretrained=runs/ivl,device=cuda --tasks mmbench_en_dev --batch_size 8

`pretrained` is a saved hybrid (`hybridize.load`) or a base model (`hybridize.load_base_model`: hub id,
directory or embedded tiny name), so the teacher runs through the same code. Generation is
`evaluation.tasks.generate_texts` (greedy, the chat template, static-cache decode on CUDA); visuals are PIL
images, or video file paths whose frames are sampled at `video_fps`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image
from tqdm.auto import tqdm

from hybridize.evaluation import default_placement
from hybridize.evaluation.lmms_eval_plugin import NAME
from hybridize.evaluation.tasks import VIDEO_FPS, check_model, generate_texts, load_model, video_frames
from hybridize.inference.chat import chat_inputs


def split_visuals(visuals: list, fps: float) -> tuple[list[Image.Image], list | None]:
    """lmms-eval's visuals of one document -> (images, video frames or None); a video is a file path."""
    images = [visual.convert("RGB") for visual in visuals if isinstance(visual, Image.Image)]
    paths = [visual for visual in visuals if isinstance(visual, (str, Path))]
    if len(images) + len(paths) != len(visuals) or len(paths) > 1 or (paths and images):
        kinds = sorted({type(visual).__name__ for visual in visuals})
        raise ValueError(f"Expected PIL images or one video path per document, got {kinds}.")
    return images, (video_frames(paths[0], fps) if paths else None)


@register_model(NAME)
class HybridizeModel(lmms):
    """A hybrid (or its base model) for lmms-eval: `generate_until` and `loglikelihood`."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        video_fps: float = VIDEO_FPS,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"Unknown model_args {sorted(kwargs)} for the hybridize model.")
        check_model(pretrained, "pretrained")
        device, dtype = default_placement(device, dtype)
        self.model, self.processor = load_model(pretrained, dtype=dtype, device=device)
        self.batch_size = int(batch_size)
        self.max_new_tokens, self.video_fps = int(max_new_tokens), float(video_fps)

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        return doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy replies, `batch_size` requests at a time, cut at the first `until` string."""
        replies = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="hybridize", disable=self.rank != 0):
            chunk = [request.args for request in requests[start : start + self.batch_size]]
            images, videos = zip(
                *(split_visuals(self._visuals(v, t, s, d), self.video_fps) for _, _, v, d, t, s in chunk),
                strict=True,
            )
            limit = max(int(kwargs.get("max_new_tokens", self.max_new_tokens)) for _, kwargs, *_ in chunk)
            texts = generate_texts(
                self.model,
                self.processor,
                [context for context, *_ in chunk],
                list(images),
                list(videos),
                max_new_tokens=limit,
            )
            for text, (_, kwargs, *_) in zip(texts, chunk, strict=True):
                until = kwargs.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                replies.append(text)
        return replies

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of the log-probabilities of the continuation's tokens after the chat prompt, whether greedy
        decoding would produce exactly them), one request at a time."""
        results = []
        for request in tqdm(requests, desc="hybridize loglikelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = request.args
            document = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(document)
            images, video = split_visuals(self._visuals(doc_to_visual, task, split, doc_id), self.video_fps)
            if video is not None:
                raise ValueError("loglikelihood on videos is not supported; use a generation task.")
            results.append(self.continuation_logprob(context, continuation, images))
        return results

    def continuation_logprob(self, context: str, continuation: str, images: list) -> tuple[float, bool]:
        prompt = chat_inputs(self.processor, [context], [images])
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        added = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        inputs = {key: value.to(self.model.device) for key, value in prompt.items()}
        added = added.to(self.model.device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], added], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(added)], dim=1)
        if "mm_token_type_ids" in inputs:  # the continuation is text (type 0)
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(added)], dim=1
            )
        logits = self.model(**inputs, use_cache=False).logits[0, -added.shape[1] - 1 : -1].float()  # (n, V)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, added[0, :, None])[:, 0]
        return logprobs.sum().item(), bool((logits.argmax(-1) == added[0]).all())

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("The hybridize model answers single-round tasks (generate_until).")
